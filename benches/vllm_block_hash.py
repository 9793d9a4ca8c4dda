"""Times vLLM's `sha256_cbor` prefix-block hashing on the prompts that
benches/benches/prefix_hashing.rs hashes with kvsidecar's chained BLAKE3.

vLLM hashes each full block of `block_size` tokens (16 by default) as
SHA-256 of the canonical CBOR encoding of the tuple (parent block hash,
block token ids, extra keys), the parent of the first block being a seed
hash. This script computes the same chain with hashlib and cbor2, the
libraries vLLM uses, and prints the median time per prompt.

Run: python benches/vllm_block_hash.py [--block-size 16] [--repeats 21]
"""

import argparse
import hashlib
import statistics
import time

import cbor2


def sha256_cbor(value) -> bytes:
    return hashlib.sha256(cbor2.dumps(value, canonical=True)).digest()


def prompt(count: int) -> list[int]:
    # The same token ids as prompt() in prefix_hashing.rs (wrapping 32-bit multiply).
    return [(i * 2_654_435_761 % 2**32) % 150_000 for i in range(count)]


def block_hashes(tokens: list[int], block_size: int, seed: bytes) -> list[bytes]:
    hashes = []
    parent = seed
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = sha256_cbor((parent, tuple(tokens[start : start + block_size]), None))
        hashes.append(parent)
    return hashes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    seed = sha256_cbor("kvsidecar benchmark seed")
    for label, count in (("1k", 1_024), ("32k", 32_768), ("128k", 131_072)):
        tokens = prompt(count)
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            block_hashes(tokens, args.block_size, seed)
            times.append(time.perf_counter() - started)
        median = statistics.median(times)
        print(f"vllm sha256_cbor block {args.block_size} {label}: {median * 1e3:.3f} ms per prompt, {count / median / 1e6:.2f} M tokens/s")


if __name__ == "__main__":
    main()
