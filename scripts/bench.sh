#!/usr/bin/env bash
# Runs kvsidecar's benchmarks; their results are recorded in docs/benchmarks.md.
#
#   scripts/bench.sh hashing    prefix hashing of 1k/32k/128k-token prompts (criterion), the BLAKE3 ceiling, vLLM's sha256_cbor
#   scripts/bench.sh miss       the sidecar's own work on a miss, in process (criterion)
#   scripts/bench.sh overhead   added latency on a miss, end to end with the tiny model
#   scripts/bench.sh restore    TTFT cold versus restored, 2k/4k/8k tokens, demo model
#   scripts/bench.sh plugins    Wasm router versus native, plugin swap time, latency during swaps
#   scripts/bench.sh transfer   peer pull of a 50 MB snapshot versus the loopback TCP ceiling
#   scripts/bench.sh fleet      trace replay on a 3-node fleet, versus engines alone and one shared cache
#   scripts/bench.sh store      snapshot store write and read throughput against raw O_DIRECT I/O (as root)
#   scripts/bench.sh index      fleet-index load, lookup time and memory at 10k, 1M and 10M blocks
#   scripts/bench.sh concurrency throughput and p99 with 1 to 64 clients, direct and through the sidecar
#   scripts/bench.sh telemetry  throughput and latency with OTLP traces and metrics at sampling 1 and 0.01, versus off
#   scripts/bench.sh            all of them
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
kvsidecar_setup

run() {
  case "$1" in
    hashing) cargo bench -p kvsidecar-benches --bench prefix_hashing && "$KVSIDECAR_PYTHON" benches/vllm_block_hash.py && "$KVSIDECAR_PYTHON" benches/vllm_block_hash.py --block-size 64 ;;
    miss) cargo bench -p kvsidecar-benches --bench miss_path ;;
    overhead) cargo build --release -p kvsidecar && cargo run --release -p kvsidecar-benches --bin proxy_overhead ;;
    restore) cargo build --release -p kvsidecar && cargo run --release -p kvsidecar-benches --bin restore_ttft ;;
    plugins) cargo build --release -p kvsidecar && cargo run --release -p kvsidecar-benches --bin plugin_overhead ;;
    transfer) cargo run --release -p kvsidecar-benches --bin peer_transfer ;;
    fleet) FLEET_REFERENCE=1 scripts/demo.sh ;;
    store) cargo run --release -p kvsidecar-benches --bin store_throughput ;;
    index) cargo run --release -p kvsidecar-benches --bin index_scale ;;
    concurrency) cargo build --release -p kvsidecar && cargo run --release -p kvsidecar-benches --bin concurrency_scale ;;
    telemetry) cargo build --release -p kvsidecar && cargo run --release -p kvsidecar-benches --bin telemetry_overhead ;;
    *) echo "bench.sh: unknown benchmark '$1'; use hashing, miss, overhead, restore, plugins, transfer, fleet, store, index, concurrency or telemetry" >&2; exit 2 ;;
  esac
}

if (($#)); then
  for name in "$@"; do run "$name"; done
else
  for name in hashing miss overhead restore plugins transfer fleet store index concurrency telemetry; do run "$name"; done
fi
