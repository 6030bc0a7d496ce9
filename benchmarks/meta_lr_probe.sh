#!/usr/bin/env bash
# Does a slower meta lr make a multi-task net learn a loss-dependent lr instead of tracking the one-step signal?
# (RESULTS.md section 8, session 5.) Two small multi-task meta-trainings that differ only in mlrs_meta_lr, then
# zoo_shapes.py probes both frozen nets with the same synthetic loss curves. About 25 min on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-outputs/meta_lr_probe}
for META_LR in 1e-3 1e-2; do
  python recipes/meta_train_multitask.py \
    --pairs digits:resnet-small:300:3e-2,fashion:resnet-small:300:3e-2,lm:gpt2-small:300:6e-3 --rounds 4 \
    --max_train_examples 12800 --mlrs_meta_lr "$META_LR" --seed 0 \
    --output_dir "$OUT/meta-lr-$META_LR" --schedule_dir "$OUT/meta-lr-$META_LR/schedule"
done
python benchmarks/zoo_shapes.py --schedules "$OUT/meta-lr-1e-3/schedule,$OUT/meta-lr-1e-2/schedule" --out "$OUT"
