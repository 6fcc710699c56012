#!/usr/bin/env bash
# Evaluate a model's calibration on benchmarks: accuracy, ECE, AUROC, Brier, AURC, parse rate (with
# bootstrap intervals) and reliability diagrams, per benchmark and overall.
#
#   examples/eval_checkpoint.sh                                   # offline: the tiny random Qwen3-VL
#   MODEL=out/qwen3_vl_4b-hf OUT=reports/4b examples/eval_checkpoint.sh
#
# A verl checkpoint is a folder of FSDP shards: export it to an HF folder first, then evaluate that:
#   vlcal export checkpoints/vlcal/qwen3_vl_4b out/qwen3_vl_4b-hf        # a run folder means its latest step
# On GPUs add --backend vllm --dp <GPUs>, and --recipe recipes/qwen3_vl_4b.yaml so answers get the
# training response length (a shorter budget cuts the confidence tags off and reads as miscalibration).
# Other benchmarks: `vlcal data bench NAME --out data/bench`, then --bench NAME --data-dir data/bench.
set -euo pipefail

model="${MODEL:-tiny:qwen3-vl}"
out="${OUT:-runs/examples/eval}"
limit="${LIMIT:-32}"                 # items per benchmark
vlcal_bin="${VLCAL:-vlcal}"

args=(--model "$model" --bench easy-vqa,easy-vqa-unanswerable --limit "$limit" --seed 0 --out "$out")
# the tiny model's random weights never stop on their own: a short budget keeps the offline run quick
[[ "$model" == tiny:* ]] && args+=(--max-new-tokens "${MAX_NEW_TOKENS:-16}")

"$vlcal_bin" eval "${args[@]}"
echo "report: $out (open its report.md; the figures are beside it)"
