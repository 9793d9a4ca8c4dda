#!/usr/bin/env bash
# Installs everything kvsidecar's tests and demo need, once, into a cache outside the clone:
# Debian build tools and Prometheus, a Python virtual environment, llama-server built from the
# llama-cpp-python source package, the generated test and demo models, and the WebAssembly targets
# for plugins. Safe to run again: finished steps are skipped.
#
#   scripts/setup.sh           what the tests and the demo need
#   scripts/setup.sh --bench   also what the benchmarks compare against: Debian's nginx-light and
#                              wrk, and SGLang's and vLLM's routers from PyPI in their own
#                              Python environment. A router that cannot be installed is reported,
#                              and the benchmarks skip it.
#
#   KVSIDECAR_CACHE  cache folder (default ~/.cache/kvsidecar)
#
# Prints the paths it set up on its last lines.
set -euo pipefail

cache="${KVSIDECAR_CACHE:-$HOME/.cache/kvsidecar}"
here="$(cd "$(dirname "$0")" && pwd)"
llama_cpp_python_version="0.3.36"
bench=false
if (($# > 1)); then
  echo "setup.sh: too many arguments ($*); the only option is --bench" >&2
  exit 2
fi
case "${1:-}" in
  "") ;;
  --bench) bench=true ;;
  *) echo "setup.sh: unknown option '$1'; the only option is --bench" >&2; exit 2 ;;
esac
mkdir -p "$cache"

log() { printf 'setup: %s\n' "$*" >&2; }

# Debian packages: a C++ toolchain and CMake for llama.cpp, libclang for the RocksDB bindings,
# Prometheus and promtool for the metrics tests.
packages=(cmake ninja-build clang libclang-dev build-essential prometheus)
"$bench" && packages+=(nginx-light wrk)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  sudo_cmd=()
  [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)

  # The prometheus and nginx packages start their services on installation, listening on ports
  # 9090 and 80 of every interface, but tests and benchmarks start their own on loopback. invoke-rc.d and
  # deb-systemd-invoke skip a start when /usr/sbin/policy-rc.d exits 101, so such a file is put in
  # place for the installation where none exists (containers often have one already).
  policy=/usr/sbin/policy-rc.d
  policy_added=false
  if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\n# Denies service starts while kvsidecar setup.sh installs packages.\nexit 101\n' \
      | "${sudo_cmd[@]}" tee "$policy" >/dev/null
    "${sudo_cmd[@]}" chmod 0755 "$policy"
    policy_added=true
    trap '"${sudo_cmd[@]}" rm -f "$policy"' EXIT
  fi
  "${sudo_cmd[@]}" apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  if "$policy_added"; then
    "${sudo_cmd[@]}" rm -f "$policy"
    trap - EXIT
  fi

  # An existing policy-rc.d may allow the start, so a running service is stopped here. Under
  # systemd it is also disabled, so it does not start at boot.
  for service in prometheus nginx; do
    [[ " ${missing[*]} " == *" $service"[\ -]* ]] || continue
    if [[ -d /run/systemd/system ]]; then
      "${sudo_cmd[@]}" systemctl disable --now "$service.service" >/dev/null 2>&1
    elif "${sudo_cmd[@]}" "/etc/init.d/$service" status >/dev/null 2>&1; then
      log "stopping the $service service that the package started"
      "${sudo_cmd[@]}" "/etc/init.d/$service" stop >/dev/null
    fi
  done
fi

# WebAssembly targets: plugins build for wasm32-unknown-unknown; one test plugin builds for
# wasm32-wasip2 to check that WASI imports are rejected.
for target in wasm32-unknown-unknown wasm32-wasip2; do
  if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    log "adding Rust target $target"
    rustup target add "$target" >/dev/null
  fi
done

# Python environment for the model generator, the OpenAI SDK tests and the demo.
venv="$cache/venv"
requirements="$here/requirements.txt"
if [[ ! -x "$venv/bin/python" ]]; then
  log "creating Python environment in $venv"
  python3 -m venv "$venv"
fi
if ! cmp -s "$requirements" "$venv/.requirements"; then
  log "installing Python packages from $requirements"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$venv/.requirements"
fi

# llama-server, built from the llama.cpp tree vendored in the llama-cpp-python source package.
engine_bin="$cache/engine/bin/llama-server"
if [[ ! -x "$engine_bin" ]]; then
  work="$cache/engine/src"
  rm -rf "$work"
  mkdir -p "$work" "$cache/engine/bin"
  log "downloading llama-cpp-python $llama_cpp_python_version source package"
  "$venv/bin/pip" download -q --disable-pip-version-check --no-deps --no-binary :all: \
    "llama-cpp-python==$llama_cpp_python_version" -d "$work"
  tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
  tree="$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)"
  log "building llama-server (several minutes on 2 cores)"
  cmake -S "$tree" -B "$work/build" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF >"$work/cmake.log" 2>&1 \
    || { tail -n 40 "$work/cmake.log" >&2; exit 1; }
  cmake --build "$work/build" --target llama-server -j2 >"$work/build.log" 2>&1 \
    || { tail -n 40 "$work/build.log" >&2; exit 1; }
  install -m 0755 "$work/build/bin/llama-server" "$engine_bin.tmp"
  mv "$engine_bin.tmp" "$engine_bin"
  rm -rf "$work"
fi

# Models with random weights and a fixed seed: deterministic output at temperature 0.
models="$cache/models"
mkdir -p "$models"
generator="$here/make_model.py"
stamp="$(sha256sum "$generator" | cut -c1-16)"
for spec in "tiny 4 256 2" "demo 12 768 4"; do
  read -r name layers width kv_heads <<<"$spec"
  target="$models/$name-$layers-$width-$kv_heads-$stamp.gguf"
  if [[ ! -f "$target" ]]; then
    log "generating model $name ($layers layers, width $width)"
    "$venv/bin/python" "$generator" --layers "$layers" --width "$width" --kv-heads "$kv_heads" \
      --name "kvsidecar-$name" --output "$target.tmp"
    mv "$target.tmp" "$target"
  fi
  ln -sfn "$(basename "$target")" "$models/$name.gguf"
done

# The routers the benchmarks compare against, pinned, in an environment of their own.
if "$bench"; then
  routers="$cache/routers"
  for spec in "sglang-router 0.3.2" "vllm-router 0.1.17"; do
    read -r package version <<<"$spec"
    installed=""
    [[ -x "$routers/bin/pip" ]] && installed="$("$routers/bin/pip" show "$package" 2>/dev/null | sed -n 's/^Version: //p')"
    if [[ ! -x "$routers/bin/$package" || "$installed" != "$version" ]]; then
      [[ -x "$routers/bin/pip" ]] || python3 -m venv "$routers"
      log "installing $package $version from PyPI into $routers"
      "$routers/bin/pip" install -q --disable-pip-version-check "$package==$version" \
        || log "could not install $package $version; the benchmarks that compare with it will skip it"
    fi
  done
fi

echo "KVSIDECAR_LLAMA_SERVER=$engine_bin"
echo "KVSIDECAR_TINY_MODEL=$models/tiny.gguf"
echo "KVSIDECAR_DEMO_MODEL=$models/demo.gguf"
echo "KVSIDECAR_PYTHON=$venv/bin/python"
