# Sourced by the project scripts: the cache folder, the shared cargo target folder, and the
# paths that setup.sh prints.
export KVSIDECAR_CACHE="${KVSIDECAR_CACHE:-$HOME/.cache/kvsidecar}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$KVSIDECAR_CACHE/target}"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"

# Runs setup.sh and exports the KEY=VALUE lines it prints.
kvsidecar_setup() {
  local line
  while IFS= read -r line; do
    case "$line" in
      KVSIDECAR_*=*) export "${line?}" ;;
    esac
  done < <("$(dirname "${BASH_SOURCE[0]}")/setup.sh")
}
