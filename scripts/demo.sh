#!/usr/bin/env bash
# The main job: a fleet of llama-server engines, each with kvsidecar in front of it, on loopback.
# It replays the start of the conversation trace round-robin over the sidecars, as a load
# balancer without cache awareness would, so the turns of one conversation land on different
# nodes and the sidecars pull or forward the prefixes between them. Then it replays the same
# requests round-robin over fresh engines without sidecars and prints both runs side by side.
#
#   KVSIDECAR_TRACE     trace file in the Mooncake format (default: the conversation trace in the
#                       data folder beside the checkout)
#   FLEET_SIZE          engines in the fleet (default 3)
#   FLEET_REFERENCE     set to 1 for a third run: one sidecar whose engine has all the fleet's
#                       slots, the single shared cache the fleet's hits are measured against
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
fleet_size="${FLEET_SIZE:-3}"
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

# Starts a llama-server on port $1 with its log in $2, saving slots under $3.
start_engine() {
  local port="$1" log="$2" slots="$3"
  mkdir -p "$slots"
  "$KVSIDECAR_LLAMA_SERVER" --host 127.0.0.1 --port "$port" -m "$KVSIDECAR_DEMO_MODEL" \
    -c 16384 -np 2 -t 2 --cache-ram 0 --slot-save-path "$slots" >"$log" 2>&1 &
  pids+=($!)
  wait_for "http://127.0.0.1:$port/health" "llama-server"
}

stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
}

echo "== machine load before the runs (the comparison means little on a busy machine): $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== run 1: $fleet_size llama-servers, each with kvsidecar in front, as one fleet (snapshot.min_tokens 128)"
head -c 32 /dev/urandom | base64 >"$work/peer-token"
declare -a engine_ports sidecar_ports admin_ports peer_ports
for ((n = 0; n < fleet_size; n++)); do
  engine_ports[n]="$(free_port)"; sidecar_ports[n]="$(free_port)"; admin_ports[n]="$(free_port)"; peer_ports[n]="$(free_port)"
done
targets=()
for ((n = 0; n < fleet_size; n++)); do
  start_engine "${engine_ports[n]}" "$work/engine-$n.log" "$work/slots-$n"
  peers=()
  for ((m = 0; m < fleet_size; m++)); do
    ((m == n)) || peers+=("http://127.0.0.1:${peer_ports[m]}")
  done
  KVSIDECAR_SNAPSHOT_MIN_TOKENS=128 "$bin/kvsidecar" serve --engine "http://127.0.0.1:${engine_ports[n]}" \
    --listen "127.0.0.1:${sidecar_ports[n]}" --admin-listen "127.0.0.1:${admin_ports[n]}" \
    --peer-listen "127.0.0.1:${peer_ports[n]}" --peers "$(IFS=,; echo "${peers[*]}")" \
    --peer-token-file "$work/peer-token" \
    --data-dir "$work/data-$n" --slot-dir "$work/slots-$n" >"$work/kvsidecar-$n.log" 2>&1 &
  pids+=($!)
  targets+=("http://127.0.0.1:${sidecar_ports[n]}")
done
for ((n = 0; n < fleet_size; n++)); do
  wait_for "http://127.0.0.1:${sidecar_ports[n]}/readyz" "kvsidecar $n"
  # The replay starts once every sidecar lists all the others as alive.
  for _ in $(seq 1 100); do
    alive="$(curl -fsS "http://127.0.0.1:${admin_ports[n]}/admin/peers" | python3 -c 'import json,sys; print(sum(1 for p in json.load(sys.stdin)["peers"] if p["alive"]))')"
    ((alive == fleet_size - 1)) && break
    sleep 0.2
  done
done
"$bin/replay" run --target "$(IFS=,; echo "${targets[*]}")" --trace "$trace" --label kvsidecar-fleet \
  --out "$work/with.json" "${replay_args[@]}"
for ((n = 0; n < fleet_size; n++)); do
  curl -fsS "http://127.0.0.1:${admin_ports[n]}/admin/stats" | python3 -c 'import json,sys; s=json.load(sys.stdin); r=s["requests"]; print("sidecar '"$n"':", "sources", json.dumps(r["cache_source"]), "peer", json.dumps(r["peer"]), "store entries", s["store"]["entries"])'
done
stop_all

echo "== run 2: the same requests round-robin over $fleet_size fresh llama-servers alone"
targets=()
for ((n = 0; n < fleet_size; n++)); do
  port="$(free_port)"
  start_engine "$port" "$work/engine-alone-$n.log" "$work/slots-alone-$n"
  targets+=("http://127.0.0.1:$port")
done
"$bin/replay" run --target "$(IFS=,; echo "${targets[*]}")" --trace "$trace" --label engines-only \
  --out "$work/without.json" "${replay_args[@]}"

stop_all

echo "== side by side"
"$bin/replay" compare "$work/with.json" "$work/without.json"

if [[ "${FLEET_REFERENCE:-0}" == 1 ]]; then
  echo "== run 3: one kvsidecar whose llama-server has all $((2 * fleet_size)) slots: one shared cache"
  engine_port="$(free_port)"; sidecar_port="$(free_port)"; admin_port="$(free_port)"
  mkdir -p "$work/slots-shared"
  "$KVSIDECAR_LLAMA_SERVER" --host 127.0.0.1 --port "$engine_port" -m "$KVSIDECAR_DEMO_MODEL" \
    -c $((16384 * fleet_size)) -np $((2 * fleet_size)) -t 2 --cache-ram 0 --slot-save-path "$work/slots-shared" >"$work/engine-shared.log" 2>&1 &
  pids+=($!)
  wait_for "http://127.0.0.1:$engine_port/health" "llama-server"
  KVSIDECAR_SNAPSHOT_MIN_TOKENS=128 "$bin/kvsidecar" serve --engine "http://127.0.0.1:$engine_port" \
    --listen "127.0.0.1:$sidecar_port" --admin-listen "127.0.0.1:$admin_port" \
    --data-dir "$work/data-shared" --slot-dir "$work/slots-shared" >"$work/kvsidecar-shared.log" 2>&1 &
  pids+=($!)
  wait_for "http://127.0.0.1:$sidecar_port/readyz" "kvsidecar"
  "$bin/replay" run --target "http://127.0.0.1:$sidecar_port" --trace "$trace" --label one-shared-cache \
    --out "$work/shared.json" "${replay_args[@]}"
  python3 - "$work/with.json" "$work/shared.json" <<'PY'
import json, sys
fleet, shared = (json.load(open(path)) for path in sys.argv[1:3])
hits = lambda run: sum(record["cached_tokens"] for record in run["records"])
print(f"fleet hit tokens {hits(fleet)} of one shared cache's {hits(shared)}: {100 * hits(fleet) / max(hits(shared), 1):.1f} %")
PY
fi
