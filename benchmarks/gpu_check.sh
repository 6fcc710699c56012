#!/usr/bin/env bash
# benchmarks/gpu_check.py on the GPU machine: installs the wheels carried in .whl (benchmarks/gpu_wheels.sh)
# into a --target folder, puts that folder and the repository on PYTHONPATH, and runs the check; arguments go
# to gpu_check.py. The image's python3 holds torch and transformers; nothing is fetched.
#
#   bash benchmarks/gpu_check.sh [gpu_check.py arguments]
#
# GPU_CHECK_PYTHON, GPU_CHECK_PIP, GPU_CHECK_WHEELS and GPU_CHECK_SITE override the interpreter, the pip
# that installs, the wheel folder and the target folder (the CPU rehearsal test uses them).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${GPU_CHECK_PYTHON:-python3}
PIP=${GPU_CHECK_PIP:-"$PYTHON -m pip"}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
SITE=${GPU_CHECK_SITE:-/tmp/vlcal_gpu_site}

shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
  echo "gpu_check.sh: no wheels in $WHEELS: run 'bash benchmarks/gpu_wheels.sh' here and carry $WHEELS" >&2
  exit 2
fi
# shellcheck disable=SC2086  # PIP may be a command with arguments
$PIP install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
exec "$PYTHON" benchmarks/gpu_check.py "$@"
