#!/usr/bin/env bash
# Chapter 09's paged decode kernel on a GPU: its bf16 check against the reference (fresh random,
# fragmented block tables; every output element written), then one layer of decode attention
# timed as gather reference vs FlexAttention vs the Triton kernel. Everything lands in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/tests PYTHONUNBUFFERED=1 COURSE_COMMIT=${COURSE_COMMIT:-unknown}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import test_paged_decode as t; t.test_the_triton_kernel_on_the_gpu_in_bf16(); print('kernel: bf16 check passed')"
python3 bench/paged_attention.py --device cuda --dtype bfloat16 --batch 1 16 64 128 256 --out "$OUT" 2>&1 | grep -v Warning
