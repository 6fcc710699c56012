#!/usr/bin/env bash
# Train Qwen3-VL-8B with VL-Calibration on a Ray cluster: from `ray job submit` to `ray job logs`.
#
#   RAY_ADDRESS=http://<head>:8265 examples/cluster_8b.sh [hydra overrides ...]
#   DRY_RUN=1 examples/cluster_8b.sh          # print the commands instead of running them
#
# Recipe: recipes/qwen3_vl_8b.yaml (2 nodes × 8 GPUs, vLLM TP 2, FSDP2; one node: add
# trainer.nnodes=1 actor_rollout_ref.actor.fsdp_config.optimizer_offload=true).
#
# Before this script, once per cluster (see recipes/README.md):
#   1. the same Python environment on every node:       pip install -e '.[gpu]'
#   2. shared storage, exported here and forwarded to the job by launch/submit.sh:
#        VLCAL_MODEL_DIR/Qwen3-VL-8B-Instruct/            the HF model folder
#        VLCAL_DATA_DIR/vl_calibration_12k/{train,val}.parquet
#                                                         vlcal data virl --source /data/ViRL39K
#        VLCAL_CKPT_DIR, TENSORBOARD_DIR                  checkpoints and logs
#   3. Ray: launch/ray_head.sh on the head node, launch/ray_worker.sh <head-ip> on the other node
#      (or sbatch launch/slurm_example.sbatch recipes/qwen3_vl_8b.yaml); with token auth, the same
#      RAY_AUTH_MODE=token / RAY_AUTH_TOKEN in this shell as on the cluster.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
recipe="recipes/qwen3_vl_8b.yaml"
address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
experiment="${EXPERIMENT:-qwen3_vl_8b_full}"
submission_id="${SUBMISSION_ID:-vlcal-${experiment}-$(date +%Y%m%d-%H%M%S)}"
ray_bin="${VLCAL_RAY:-ray}"
dry=()
[[ "${DRY_RUN:-0}" == 1 ]] && dry=(--dry-run)
run() { if [[ ${#dry[@]} -gt 0 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }

cd "$repo"

# 4. validate on the cluster first: the job composes the recipe and runs verl's own pre-Ray checks
#    (config keys, batch arithmetic, vLLM parallelism), no GPUs are touched; a mistake costs seconds
launch/submit.sh --recipe "$recipe" --address "$address" --check "${dry[@]}"

# 5. submit the training job and return at once (--no-wait); the submission id names it for later.
#    Resubmitting the same trainer.experiment_name resumes from its latest checkpoint.
launch/submit.sh --recipe "$recipe" --address "$address" --no-wait --submission-id "$submission_id" \
  "${dry[@]}" -- trainer.experiment_name="$experiment" "$@"

# 6. follow the driver's output until the job ends (Ctrl-C stops following, not the job).
#    Per-step metrics: verl's step lines here, TensorBoard under $TENSORBOARD_DIR (calib/*, vce/*, tar/*).
run "$ray_bin" job logs --address "$address" --follow "$submission_id"

# 7. afterwards: the job's final state (stop a run with: ray job stop --address ADDR ID)
run "$ray_bin" job status --address "$address" "$submission_id"
