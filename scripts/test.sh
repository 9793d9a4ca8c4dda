#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, and end-to-end tests against real llama-server
# processes with the generated tiny model. Installs what is missing first (see setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
kvsidecar_setup

cargo build --workspace --all-targets
# The shipped policy plugins, into the plugins folder beside the binary (the default plugins.dir).
"$CARGO_TARGET_DIR/debug/kvsidecar" plugin build -- -p prefix-affinity -p least-loaded -p lru -p cost-aware -p min-tokens >/dev/null
# End-to-end tests start engines that use both cores, so they run one at a time.
cargo nextest run --workspace --test-threads 1 --no-fail-fast "$@"
