#!/usr/bin/env bash
# The card's power and the bytes that cost it, in one call (about 3 minutes on an H200): the
# matmul peak in a burst against the same matmuls held for seconds (sustained_peak), a mixed
# step's MLP in chunks of tokens so that SwiGLU's intermediate stays in L2 (mlp_chunks), and the
# small-batch projections with the next weights read into L2 beside them (l2_prefetch). Needs no
# model weights and no tokenizer.
#
#   COURSE_COMMIT=$(git rev-parse --short HEAD) bash bench/gpu/gpu_power.sh     # on the GPU
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 COURSE_COMMIT=${COURSE_COMMIT:-unknown}
nvidia-smi --query-gpu=name,uuid,power.limit,clocks.max.sm --format=csv,noheader
for experiment in sustained_peak mlp_chunks l2_prefetch; do
  echo "== $experiment"
  timeout 240 python3 -m bench "$experiment" --out "$OUT" 2>&1 | grep -v Warning | tail -30
done
