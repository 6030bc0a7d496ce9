#!/usr/bin/env bash
# The held-out cells of issue 9's protocol, end to end: build the multi-task default's four leave-one-task-out
# variants (each a selection over 3 draws, about 50 minutes on 2 CPU cores; resumable: rerun after a kill) and copy
# each into benchmarks/heldout_nets/ (committed: rebuilds differ between machines, RESULTS.md 3b), then run
# the learned scale with each task's variant frozen from the protocol's 5 starting lrs x 3 seeds, with both meta
# sources (records appended to benchmarks/results/scale_lab.jsonl; `python benchmarks/lab_report.py protocol ...`
# reads them). Long: run it in the background, alone on the machine.
#
#     nohup bash benchmarks/heldout_variants.sh > outputs/heldout_variants.log 2>&1 &
#     TASKS="digits fashion" bash benchmarks/heldout_variants.sh build      # only some tasks, only the builds
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
phase=${1:-all}
tasks=${TASKS:-bbc digits fashion lm}
starts=1e-6,1e-5,1e-4,1e-3,1e-2
if [[ $phase == all || $phase == build ]]; then
  for t in $tasks; do
    committed=benchmarks/heldout_nets/multitask-without-$t
    if [[ -f $committed/model.safetensors ]]; then
      echo "$committed is committed: measured with it (delete it to measure a rebuild)"
      continue
    fi
    built=outputs/zoo/multitask-without-$t-select3/schedule
    [[ -f $built/model.safetensors ]] || python recipes/zoo.py --entry multitask-without-$t --select 3
    mkdir -p "$committed"  # the net, its config and card (benchmarks/quality.py reads this copy first)
    cp "$built/model.safetensors" "$built/config.json" "$built/README.md" "$committed/"
  done
fi
if [[ $phase == all || $phase == protocol ]]; then
  for t in $tasks; do
    python benchmarks/scale_lab.py $t mlrs_frozen:default $starts 0,1,2 '{"mlrs_meta_source": "held_out"}'
    python benchmarks/scale_lab.py $t mlrs_frozen:default $starts 0,1,2 '{"mlrs_meta_source": "next_batch"}'
  done
fi
