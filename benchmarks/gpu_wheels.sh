#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.py needs that the GPU machine's image lacks, for its CPython 3.12 on
# x86_64 (the image: benchmarks/gpu_image_packages.txt; it has torch, transformers, numpy, pandas, pyarrow,
# pyyaml, psutil, ... but no verl, Ray, Hydra or tensordict). Found by importing the check's modules in an
# environment of the image's packages alone (tests/benchmarks/test_gpu_check_rehearsal.py does it each run):
#   verl 0.9.1                      the code under test (its own requirements are not installed: --no-deps)
#   tensordict, pyvers, orjson      verl's batch type and tensordict's imports
#   omegaconf, antlr4 4.9.3         verl.utils.config (imported by every verl module); antlr4 4.9.3 is a
#                                   source release only: built here into a pure-Python wheel
#   datasets, dill, multiprocess    verl.utils.dataset, imported by verl's FSDP engine module
#   codetiming                      verl.trainer.ppo.core_algos
# Ray is not among them (its wheel alone exceeds the 64 MiB that may travel): gpu_check.py's import shim.
# Versions are the ones the project's environment is tested with.
#
#   bash benchmarks/gpu_wheels.sh [--python-version 3.12] [--dest .whl]
#
# Writes one wheel per package into --dest (default .whl, then added to .git/info/exclude), refuses any
# other wheel there (gpu_check.sh installs every *.whl of the folder), and fails above 50 MiB in all.
set -euo pipefail
cd "$(dirname "$0")/.."

PY_VERSION=3.12
DEST=.whl
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PY_VERSION=${2:?}; shift 2 ;;
    --dest) DEST=${2:?}; shift 2 ;;
    *) echo "gpu_wheels.sh: unknown argument '$1' (use --python-version X.Y, --dest DIR)" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python3}
LIMIT_BYTES=$((50 * 1024 * 1024))
BINARY=(verl==0.9.1 tensordict==0.10.0 pyvers==0.1.0 orjson==3.13.0 omegaconf==2.3.1
        datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 codetiming==1.4.0)
SOURCE_ONLY=(antlr4-python3-runtime==4.9.3)

mkdir -p "$DEST"
if [ "$DEST" = .whl ]; then
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qxF /.whl/ "$exclude" 2>/dev/null || echo /.whl/ >>"$exclude"
fi
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${BINARY[@]}"
"$PYTHON" -m pip wheel -q --no-deps -w "$DEST" "${SOURCE_ONLY[@]}"

# exactly one wheel per package, nothing else
want=()
for spec in "${BINARY[@]}" "${SOURCE_ONLY[@]}"; do
  want+=("$(echo "${spec%%==*}" | tr '[:upper:]-.' '[:lower:]__')")
done
status=0
declare -A seen=()
for whl in "$DEST"/*.whl; do
  name=$(basename "$whl" | cut -d- -f1 | tr '[:upper:]-.' '[:lower:]__')
  if [[ ! " ${want[*]} " == *" $name "* ]]; then
    echo "gpu_wheels.sh: $whl is not a wheel the GPU check needs: remove it (gpu_check.sh installs every wheel in $DEST)" >&2
    status=1
  elif [ -n "${seen[$name]:-}" ]; then
    echo "gpu_wheels.sh: two wheels of $name in $DEST (${seen[$name]}, $(basename "$whl")): keep one" >&2
    status=1
  fi
  seen[$name]=$(basename "$whl")
done
for name in "${want[@]}"; do
  [ -n "${seen[$name]:-}" ] || { echo "gpu_wheels.sh: no wheel of $name in $DEST" >&2; status=1; }
done
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
if [ "$total" -gt "$LIMIT_BYTES" ]; then
  echo "gpu_wheels.sh: $DEST holds $total bytes of wheels, over the $LIMIT_BYTES-byte (50 MiB) budget" >&2
  status=1
fi
[ "$status" -eq 0 ] || exit "$status"
echo "gpu_wheels.sh: ${#want[@]} wheels for CPython $PY_VERSION in $DEST, $((total / 1024)) KiB (budget 50 MiB)"
