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
#   scripts/bench.sh store-scale insert and lookup time, memory and disk use at 10^3 and 10^4 snapshots
#   scripts/bench.sh index      fleet-index load, lookup time and memory at 10k, 1M and 10M blocks
#   scripts/bench.sh concurrency throughput and p99 with 1 to 64 clients, direct and through the sidecar
#   scripts/bench.sh telemetry  throughput and latency with OTLP traces and metrics at sampling 1 and 0.01, versus off
#   scripts/bench.sh proxy      latency and throughput through kvsidecar, SGLang's router and vLLM's router, nginx upstream
#   scripts/bench.sh engines    trace replay on two engines: round-robin, SGLang's router, a 2-node kvsidecar fleet
#   scripts/bench.sh            all of them
#
# Each benchmark's output is also written to docs/results/NAME.txt (or under KVSIDECAR_RESULTS),
# headed by the date, the commit and the machine; docs/benchmarks.md summarizes those files.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

# Installs the systems the comparisons run against. A failed installation is reported; the
# benchmark then skips each comparison whose tool is missing, naming it.
install_peers() {
  scripts/setup.sh --bench >/dev/null \
    || echo "bench.sh: scripts/setup.sh --bench failed; comparisons whose tools are missing will be skipped" >&2
}

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
    store-scale) cargo run --release -p kvsidecar-benches --bin store_scale ;;
    index) cargo run --release -p kvsidecar-benches --bin index_scale ;;
    concurrency) cargo build --release -p kvsidecar && cargo run --release -p kvsidecar-benches --bin concurrency_scale ;;
    telemetry) cargo build --release -p kvsidecar && cargo run --release -p kvsidecar-benches --bin telemetry_overhead ;;
    proxy) install_peers && cargo build --release -p kvsidecar && cargo run --release -p kvsidecar-benches --bin proxy_compare ;;
    engines) install_peers && cargo build --release -p kvsidecar && cargo run --release -p kvsidecar-benches --bin engine_compare ;;
    *) echo "bench.sh: unknown benchmark '$1'; use hashing, miss, overhead, restore, plugins, transfer, fleet, store, store-scale, index, concurrency, telemetry, proxy or engines" >&2; exit 2 ;;
  esac
}

all=(hashing miss overhead restore plugins transfer fleet store store-scale index concurrency telemetry proxy engines)
for name in "$@"; do
  if [[ " ${all[*]} " != *" $name "* ]]; then
    echo "bench.sh: unknown benchmark '$name'; use one of: ${all[*]}" >&2
    exit 2
  fi
done

kvsidecar_setup

results="${KVSIDECAR_RESULTS:-docs/results}"
mkdir -p "$results"

# Runs benchmark $1 and keeps what it printed, build output aside, in $results/$1.txt.
record() {
  local out="$results/$1.txt"
  {
    echo "# scripts/bench.sh $1"
    echo "# date: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' with local changes')"
    echo "# machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(awk '/MemTotal/ {printf "%.0f GB", $2 / 1048576}' /proc/meminfo), load average $(cut -d' ' -f1-3 /proc/loadavg)"
  } >"$out.tmp"
  if run "$1" | tee -a "$out.tmp"; then
    mv "$out.tmp" "$out"
  else
    echo "bench.sh: $1 failed; its output so far is in $out.tmp" >&2
    return 1
  fi
}

if (($#)); then
  for name in "$@"; do record "$name"; done
else
  for name in "${all[@]}"; do record "$name"; done
fi
