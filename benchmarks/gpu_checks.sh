#!/usr/bin/env bash
# The GPU checks of the kernel issue, as one script for a short lease on a CUDA machine (see README "Kernels").
# Runs from the repository root; writes logs and JSON under ${OUT:-out/gpu}. Wheels the machine lacks can be put in
# .whl/ (installed to /tmp/site, no network needed).
set -uo pipefail
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/env.txt"
# 0. Tile sweep of the DoRA kernels (lora_linear and masked_linear defaults come from an earlier sweep).
timeout 120 python3 -m benchmarks.kernel_tuning --ops dora_linear --json "$OUT/tuning_dora.json" 2>&1 \
  | tee "$OUT/tuning_dora.log"
# 1. GPU-only tests: compiled kernels in fp32/fp16/bf16, adapters on CUDA in mode auto.
timeout 180 python3 -m pytest tests/kernels -m gpu -q -p no:cacheprovider -rA 2>&1 | tee "$OUT/gpu_tests.log"
# 2. Every op, ViT-B/16 and ViT-L/14 shapes, batch 32 and 128, bf16: Triton vs eager reference.
timeout 200 python3 -m benchmarks.kernels --dtype bf16 --no-compile --json "$OUT/kernels_bf16.json" 2>&1 \
  | tee "$OUT/kernels_bf16.log"
# 3. torch.compile of the reference at ViT-B/16 batch 32 (one compile per case, so one shape only).
timeout 200 python3 -m benchmarks.kernels --dtype bf16 --models vit_b16 --batch 32 --json "$OUT/kernels_compile.json" \
  2>&1 | tee "$OUT/kernels_compile.log"
