#!/usr/bin/env bash
# The GPU checks in one go, for a session lent a GPU for a few minutes (RESULTS.md section 5): FSDP2 meta-training's
# exactness, resume and cost (benchmarks/fsdp_gpu.py), then the per-step cost of the main arms on one GPU
# (benchmarks/overhead.py --device cuda). Reports go to REPORT_DIR (default benchmarks/results), logs beside them.
#
#     bash benchmarks/gpu_checks.sh                         # on a machine with CUDA, hf_mlrs's requirements installed
#     REPORT_DIR=$OUT bash benchmarks/gpu_checks.sh         # reports elsewhere (the device tool's $OUT)
#
# Each part has its own time limit, so that one that hangs leaves the other's time.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
report=${REPORT_DIR:-benchmarks/results}
mkdir -p "$report"
python -c "import torch, transformers, accelerate; print(torch.__version__, torch.cuda.get_device_name(), \
transformers.__version__, accelerate.__version__)" 2>&1 | tee "$report/gpu_checks.log"
timeout "${FSDP_TIMEOUT:-240}" python benchmarks/fsdp_gpu.py --report_dir "$report" --out /tmp/fsdp_gpu 2>&1 \
  | tee -a "$report/gpu_checks.log"
echo "fsdp_gpu.py exit ${PIPESTATUS[0]}" | tee -a "$report/gpu_checks.log"
timeout "${OVERHEAD_TIMEOUT:-300}" python benchmarks/overhead.py --device cuda --sizes base --repeats 2 \
  --arms plain,transfer,meta_1,meta_10,learned,frozen_learned,frozen_learned_next,callback_next --out "$report" 2>&1 \
  | tee -a "$report/gpu_checks.log"
echo "overhead.py exit ${PIPESTATUS[0]}" | tee -a "$report/gpu_checks.log"
