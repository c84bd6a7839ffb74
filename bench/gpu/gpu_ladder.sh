#!/usr/bin/env bash
# Chapter 04's ladder on a GPU: llama-1b-dummy (bf16) on the anyscale workload, our engines and
# the Hugging Face peers at the same max_batch, one after the other in one process.
# Everything lands in $OUT; see bench/gpu/README.md for .gpucarry and COURSE_COMMIT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 COURSE_COMMIT=${COURSE_COMMIT:-unknown}
[ -d .gpucarry/cache ] && export COURSE_CACHE=$PWD/.gpucarry/cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
N=${N:-256}; B=${B:-64}
python3 -m bench run_ladder --model llama-1b-dummy --dtype bfloat16 --device cuda \
  --workload "anyscale:prompt_len=512,cap=512,mean=128" --n "$N" --max-batch "$B" --sequential-n 4 \
  --engines sequential static dynamic continuous hf-generate hf-cb \
  --out "$OUT/ladder_anyscale_llama-1b-dummy_gpu.json" 2>&1 | grep -v "it/s\]\|req/s\]"
