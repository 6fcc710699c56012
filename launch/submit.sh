#!/usr/bin/env bash
# Submit a VL-Calibration recipe to a Ray cluster with `ray job submit`.
#
#   launch/submit.sh --recipe recipes/qwen3_vl_4b.yaml [--address URL] [--nodes N] [--gpus-per-node G]
#                    [--check] [--dry-run] [--no-wait] [--submission-id ID] [-- hydra overrides ...]
#
#   --address        Ray dashboard URL (env VLCAL_RAY_ADDRESS, then RAY_ADDRESS; default http://127.0.0.1:8265)
#   --nodes, --gpus-per-node   override the recipe's trainer.nnodes / trainer.n_gpus_per_node
#                    (env VLCAL_NODES, VLCAL_GPUS_PER_NODE)
#   --check          run `python -m vlcal_verl.main --check` as the job: compose + validate, no training
#   --dry-run        print the exact `ray job submit ... -- python -m vlcal_verl.main ...` command and exit
#   --no-wait        return after submission (default: follow the job's logs until it ends)
#   after `--`       Hydra overrides, e.g. ablation=rlcr trainer.experiment_name=qwen3_vl_4b_rlcr
# Env: VLCAL_DATA_DIR, VLCAL_MODEL_DIR, VLCAL_CKPT_DIR, TENSORBOARD_DIR (shared storage, forwarded to the job),
#      VLCAL_RUNTIME_ENV (default launch/runtime_env.yaml), VLCAL_RAY (ray CLI), VLCAL_PYTHON (python with
#      PyYAML, to build the runtime env). Ray token auth: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN
#      (or ~/.ray/auth_token) exactly as for the cluster; the CLI sends it.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
address="${VLCAL_RAY_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}"
nodes="${VLCAL_NODES:-}"
gpus="${VLCAL_GPUS_PER_NODE:-}"
runtime_env="${VLCAL_RUNTIME_ENV:-$repo/launch/runtime_env.yaml}"
ray_bin="${VLCAL_RAY:-ray}"
python_bin="${VLCAL_PYTHON:-python3}"
recipe="" check=0 dry=0 nowait=0 sid=""
overrides=()

die() { echo "submit.sh: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --recipe) recipe="${2:?--recipe needs a file}"; shift 2 ;;
    --address) address="${2:?--address needs a URL}"; shift 2 ;;
    --nodes) nodes="${2:?--nodes needs a number}"; shift 2 ;;
    --gpus-per-node) gpus="${2:?--gpus-per-node needs a number}"; shift 2 ;;
    --submission-id) sid="${2:?--submission-id needs an id}"; shift 2 ;;
    --check) check=1; shift ;;
    --dry-run) dry=1; shift ;;
    --no-wait) nowait=1; shift ;;
    -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}"; exit 0 ;;
    --) shift; overrides=("$@"); break ;;
    *) die "unknown argument '$1' (Hydra overrides go after --)" ;;
  esac
done
[[ -n "$recipe" ]] || die "--recipe is required"
[[ "$recipe" == *.yaml ]] || die "--recipe $recipe: not a .yaml file (python -m vlcal_verl.main composes only *.yaml recipes)"
[[ -f "$recipe" ]] || die "--recipe: no such file: $recipe"
recipe_abs="$(cd "$(dirname "$recipe")" && pwd)/$(basename "$recipe")"
case "$recipe_abs" in
  "$repo"/*) recipe_rel="${recipe_abs#"$repo"/}" ;;
  *) die "--recipe must live inside the repository (it ships as the job's working_dir): $recipe_abs" ;;
esac
for n in "$nodes" "$gpus"; do [[ -z "$n" || "$n" =~ ^[1-9][0-9]*$ ]] || die "--nodes/--gpus-per-node must be positive integers, got '$n'"; done
[[ -f "$runtime_env" ]] || die "runtime env not found: $runtime_env"

# runtime env = launch/runtime_env.yaml + working_dir + the VLCAL_* roots of this shell
# the recipe travels inside working_dir: one that Ray leaves out (git-ignored, or matching the runtime env's
# excludes) would be "no such file" on the cluster, after the queue wait
if git -C "$repo" check-ignore -q -- "$recipe_rel" 2>/dev/null; then
  die "--recipe $recipe_rel is git-ignored, so Ray does not ship it with the job; put it under recipes/"
fi
runtime_json="$("$python_bin" - "$runtime_env" "$repo" "$recipe_rel" <<'PY'
import fnmatch, json, os, sys
import yaml
env = yaml.safe_load(open(sys.argv[1])) or {}
env["working_dir"] = sys.argv[2]
parts = sys.argv[3].split("/")
for pattern in env.get("excludes") or []:  # gitignore syntax, as Ray reads it (the forms this file uses)
    core, dirs = pattern.strip("/"), parts[:-1] if pattern.endswith("/") else parts
    if pattern.startswith("/"):
        hit = any(fnmatch.fnmatch("/".join(parts[: i + 1]), core) for i in range(len(dirs)))
    else:
        hit = any(fnmatch.fnmatch(name, core.removeprefix("**/")) for name in dirs)
    if hit:
        print(f"submit.sh: --recipe {sys.argv[3]} matches {pattern!r} in {sys.argv[1]}'s excludes, so "
              "Ray does not ship it with the job; put it under recipes/", file=sys.stderr)
        sys.exit(2)
for key in ("VLCAL_DATA_DIR", "VLCAL_MODEL_DIR", "VLCAL_CKPT_DIR", "TENSORBOARD_DIR"):
    if os.environ.get(key):
        env.setdefault("env_vars", {})[key] = os.environ[key]
print(json.dumps(env, sort_keys=True))
PY
)"

job=(python -m vlcal_verl.main)
[[ $check -eq 1 ]] && job+=(--check)
job+=(--recipe "$recipe_rel")
[[ -n "$nodes" ]] && job+=("trainer.nnodes=$nodes")
[[ -n "$gpus" ]] && job+=("trainer.n_gpus_per_node=$gpus")
job+=("${overrides[@]}")

cmd=("$ray_bin" job submit --address "$address" --runtime-env-json "$runtime_json")
[[ -n "$sid" ]] && cmd+=(--submission-id "$sid")
[[ $nowait -eq 1 ]] && cmd+=(--no-wait)
cmd+=(-- "${job[@]}")

if [[ $dry -eq 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
