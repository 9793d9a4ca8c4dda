#!/usr/bin/env bash
# The main job on one node. It starts llama-server with the demo model and kvsidecar in front of
# it, and replays the start of the conversation trace through the sidecar. Then it replays the
# same requests against a fresh llama-server without the sidecar and prints both runs side by side.
#
#   KVSIDECAR_TRACE     trace file in the Mooncake format (default: the conversation trace in the
#                       data folder beside the checkout)
#   REPLAY_ARGS         extra arguments of `replay run` (default: see below)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
kvsidecar_setup

cargo build --release -p kvsidecar -p kvsidecar-benches
bin="$CARGO_TARGET_DIR/release"
# The shipped policy plugins, into the plugins folder beside the binary (the default plugins.dir).
"$bin/kvsidecar" plugin build -- -p prefix-affinity -p least-loaded -p lru -p cost-aware -p min-tokens >/dev/null
trace="${KVSIDECAR_TRACE:-../shared/data/traces/conversation_trace.jsonl}"
# The requests of the trace's first 12 multi-turn conversations (36 requests), each 512-token
# trace block scaled to 64 tokens, prompts cut to 3,008 tokens, at most 16 output tokens.
read -r -a replay_args <<<"${REPLAY_ARGS:---sessions 12 --requests 1000 --block-tokens 64 --max-prompt-tokens 3008 --max-output-tokens 16}"
work="$(mktemp -d -t kvsidecar-demo-XXXXXX)"
pids=()
cleanup() {
  local status=$?
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if ((status == 0)); then
    rm -rf "$work"
  else
    echo "demo: failed; logs and results are kept in $work" >&2
  fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_for() {
  local url="$1" name="$2"
  for _ in $(seq 1 600); do
    if curl -fsS "$url" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "demo: $name did not start; its log is in $work" >&2
  exit 1
}

start_engine() {
  local port="$1" log="$2"
  mkdir -p "$work/slots"
  "$KVSIDECAR_LLAMA_SERVER" --host 127.0.0.1 --port "$port" -m "$KVSIDECAR_DEMO_MODEL" \
    -c 16384 -np 2 -t 2 --cache-ram 0 --slot-save-path "$work/slots" >"$log" 2>&1 &
  pids+=($!)
  wait_for "http://127.0.0.1:$port/health" "llama-server"
}

echo "== machine load before the runs (the comparison means little on a busy machine): $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== run 1: llama-server with kvsidecar in front (snapshot.min_tokens 128)"
engine_port="$(free_port)"; sidecar_port="$(free_port)"; admin_port="$(free_port)"
start_engine "$engine_port" "$work/engine-1.log"
KVSIDECAR_SNAPSHOT_MIN_TOKENS=128 "$bin/kvsidecar" serve --engine "http://127.0.0.1:$engine_port" \
  --listen "127.0.0.1:$sidecar_port" --admin-listen "127.0.0.1:$admin_port" \
  --data-dir "$work/data" --slot-dir "$work/slots" >"$work/kvsidecar.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$sidecar_port/readyz" "kvsidecar"
"$bin/replay" run --target "http://127.0.0.1:$sidecar_port" --trace "$trace" --label kvsidecar \
  --out "$work/with.json" "${replay_args[@]}"
curl -fsS "http://127.0.0.1:$admin_port/admin/stats" | python3 -c 'import json,sys; s=json.load(sys.stdin); print("sidecar counters:", json.dumps(s["requests"])); print("store:", json.dumps(s["store"]))'
for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
wait 2>/dev/null || true
pids=()

echo "== run 2: the same requests against a fresh llama-server alone"
engine_port="$(free_port)"
start_engine "$engine_port" "$work/engine-2.log"
"$bin/replay" run --target "http://127.0.0.1:$engine_port" --trace "$trace" --label engine-only \
  --out "$work/without.json" "${replay_args[@]}"

echo "== side by side"
"$bin/replay" compare "$work/with.json" "$work/without.json"
