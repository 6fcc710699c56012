#!/usr/bin/env bash
# Start the reward server, run plain verl GRPO (examples/verl_reward_server/grpo.yaml) against it, stop it.
#
#   examples/verl_reward_server/run.sh [hydra overrides for verl ...]
#   RS_PORT=8000 RS_WORKERS=16 examples/verl_reward_server/run.sh trainer.total_training_steps=10
#   CONFIG=grpo_cpu examples/verl_reward_server/run.sh actor_rollout_ref.model.path=... data.train_files=...
#
# On a cluster the server usually runs apart (python -m reward_server --host 0.0.0.0 on a CPU node): then
# skip this script and pass its URL, VLCAL_REWARD_SERVER_URL=http://rm-host:8000 python -m verl.trainer.main_ppo ...
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python_bin="${PYTHON:-python}"
port="${RS_PORT:-8000}"
workers="${RS_WORKERS:-4}"
config="${CONFIG:-grpo}"              # grpo (GPU cluster) | grpo_cpu (one CPU machine)
export VLCAL_REWARD_SERVER_URL="http://127.0.0.1:${port}"
if [[ "$config" == *cpu* ]]; then
  # verl's CPU backend is chosen on `import verl`, and Ray binds to loopback only if told before import
  export VERL_PLATFORM=cpu RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false \
    HF_HUB_OFFLINE=1
  unset RAY_ADDRESS RAY_AUTH_MODE   # a private head, never a cluster named in this shell
fi

# 1. the reward server, in the background; stopped whatever happens below
"$python_bin" -m reward_server --host 127.0.0.1 --port "$port" --workers "$workers" &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true' EXIT

# 2. wait for /readyz (grading pool and torch warm), at most 120 s
ready=0
for _ in $(seq 1 240); do
  if "$python_bin" -c "import httpx,sys; sys.exit(httpx.get('$VLCAL_REWARD_SERVER_URL/readyz', timeout=2).status_code != 200)" 2>/dev/null; then
    ready=1; break
  fi
  kill -0 "$server_pid" 2>/dev/null || { echo "run.sh: the reward server exited before it was ready" >&2; exit 1; }
  sleep 0.5
done
[[ $ready -eq 1 ]] || { echo "run.sh: the reward server was not ready within 120 s" >&2; exit 1; }

# 3. verl's own entry point with this folder's config
#    (the search path finds verl's ppo_trainer.yaml, which both configs of this folder build on)
"$python_bin" -m verl.trainer.main_ppo --config-path "$here" --config-name "$config" \
  'hydra.searchpath=[pkg://verl.trainer.config]' "$@"
