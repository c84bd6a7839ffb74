#!/usr/bin/env bash
# Chapters 05-07 on a GPU: the continuous engine with contiguous rows, then packed and paged
# (whole prompts), then packed, paged and chunked, on the same anyscale requests, one process each.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 COURSE_COMMIT=${COURSE_COMMIT:-unknown}
[ -d .gpucarry/cache ] && export COURSE_CACHE=$PWD/.gpucarry/cache
W="anyscale:prompt_len=512,cap=512,mean=128"
run() { python3 -m course_lib.bench --engine continuous --model llama-1b-dummy --dtype bfloat16 \
          --workload "$W" --n 256 --max-batch 64 --steps "$@" 2>&1 | grep -v "it/s\]\|req/s\]" | tail -2; }
run --json "$OUT/paged_rows_llama-1b-dummy_gpu.json"
run --block-size 16 --json "$OUT/paged_blocks_llama-1b-dummy_gpu.json"
run --block-size 16 --max-num-batched-tokens 2048 --json "$OUT/paged_chunked_llama-1b-dummy_gpu.json"
