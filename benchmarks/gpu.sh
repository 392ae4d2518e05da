#!/usr/bin/env bash
# The LM, batched-product, HVP and sharded benchmarks on a GPU host (issue 20, item 5): every script with
# --device cuda, results under benchmarks/results/gpu/ (the CPU results stay where they are). Ranks use NCCL:
# DeepSpeed picks it on CUDA (sharded_benchmark.py's zero3_2ranks needs 2 GPUs; pipeline stages take one GPU each
# through Ray, so pipeline_2x4 needs 2).
#
#   bash benchmarks/gpu.sh                 # everything the host's GPU count allows
#   MODEL=gpt2_medium bash benchmarks/gpu.sh
#
# Set-up first (README, command 1, with the CUDA constraints instead of constraints/cpu.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/results/gpu
MODEL=${MODEL:-gpt2_small}
mkdir -p "$OUT"
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -lt 1 ]; then
  echo "no CUDA device visible to torch; this script is for GPU hosts" >&2
  exit 1
fi
echo "== $GPUS GPU(s): $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')"

echo "== top Hessian eigenvalue and products of GPT-2 small against the peers"
"$PY" benchmarks/lm_benchmark.py --device cuda --batch 8 --tokens 128 --out "$OUT/lm_benchmark.json"

echo "== batched products (k = 8) against single products"
"$PY" benchmarks/batched_products.py --device cuda --out "$OUT/batched_products.json"

echo "== HVP modes"
"$PY" benchmarks/hvp_benchmark.py --device cuda --out "$OUT/hvp_benchmark.json"

CONFIGS=local
if [ "$GPUS" -ge 2 ]; then CONFIGS="$CONFIGS,pipeline_2x4,zero3_2ranks"; fi
if [ "$GPUS" -ge 4 ]; then CONFIGS="$CONFIGS,pipeline_4x4"; fi
echo "== sharded curvature ($MODEL): $CONFIGS"
"$PY" benchmarks/sharded_benchmark.py --device cuda --model "$MODEL" --batch 8 --configs "$CONFIGS" \
  --out "$OUT/sharded_benchmark_$MODEL.json"
