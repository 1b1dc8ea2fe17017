#!/usr/bin/env bash
# The GPU check (issue 29): bf16-mixed fine-tuning, mask Fisher on the GPU equal to the CPU's within 1e-4, DDP when
# more than one GPU is visible, a merge that scores on the GPU. At most 8 minutes on one GPU; JSON on stdout and in
# $OUT/gpu_check.json (OUT: the device tool's output folder, else a temporary one). Exit 1 when a check fails.
#   bash benchmarks/gpu_check.sh                 # from the repository root, with fmn-pl's environment active
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ] && [ -z "${VIRTUAL_ENV:-}" ]; then . .venv/bin/activate; fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
python -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA GPU (a CPU build?)'" 
out=${OUT:-$(mktemp -d)}/gpu-check
timeout 480 python benchmarks/gpu_check.py --out "$out" "$@"
