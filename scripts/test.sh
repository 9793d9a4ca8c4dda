#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, and end-to-end tests against real llama-server
# processes with the generated tiny model. Installs what is missing first (see setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
kvsidecar_setup

cargo build --workspace --all-targets
# End-to-end tests start engines that use both cores, so they run one at a time.
cargo nextest run --workspace --test-threads 1 --no-fail-fast "$@"
