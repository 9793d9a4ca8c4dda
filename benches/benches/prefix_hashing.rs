//! Prefix hashing throughput: chained BLAKE3 block hashes of 1k, 32k and 128k-token prompts, and
//! the single-thread BLAKE3 ceiling for the same bytes (the prompt's token ids as 4-byte
//! little-endian words, hashed in one call). `benches/vllm_block_hash.py` times vLLM's
//! `sha256_cbor` block hashing on the same tokens, for comparison.
//!
//! Run with `cargo bench -p kvsidecar-benches --bench prefix_hashing`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kvsidecar::engine::Fingerprint;
use kvsidecar::prefix::{Namespace, block_hashes};

/// Returns the token ids of a prompt of `count` tokens, the sequence the Python script generates.
fn prompt(count: u32) -> Vec<u32> {
    (0..count).map(|i| i.wrapping_mul(2_654_435_761) % 150_000).collect()
}

fn hashing(c: &mut Criterion) {
    let namespace = Namespace::new(&Fingerprint([7; 32]), "tenant", None);
    for (label, count) in [("1k", 1_024u32), ("32k", 32_768), ("128k", 131_072)] {
        let tokens = prompt(count);
        let bytes: Vec<u8> = tokens.iter().flat_map(|token| token.to_le_bytes()).collect();
        let mut group = c.benchmark_group(format!("prefix_hashing_{label}"));
        group.throughput(Throughput::Elements(tokens.len() as u64));
        for block in [16usize, 64, 256] {
            group.bench_function(format!("block_{block}"), |b| b.iter(|| block_hashes(&namespace, &tokens, block)));
        }
        group.bench_function("blake3_ceiling", |b| b.iter(|| blake3::hash(&bytes)));
        group.finish();
    }
}

criterion_group!(benches, hashing);
criterion_main!(benches);
