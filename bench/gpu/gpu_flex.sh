#!/usr/bin/env bash
# Chapters 05-07's packed, paged attention on a GPU with FlexAttention reading the blocks in place:
# the attention alone (gather reference vs FlexAttention), then the continuous engine on the same
# anyscale requests with contiguous rows, paged + gather, paged + FlexAttention (whole prompts and
# chunked), and paged + FlexAttention with a larger batch in the rows' KV memory. One process each.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 COURSE_COMMIT=${COURSE_COMMIT:-unknown}
[ -d .gpucarry/cache ] && export COURSE_CACHE=$PWD/.gpucarry/cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m bench paged_attention --device cuda --dtype bfloat16 --out "$OUT" 2>&1 | grep -v Warning
W="anyscale:prompt_len=512,cap=512,mean=128"; N=${N:-256}
run() { TORCH_LOGS=${TORCH_LOGS:-recompiles} python3 -m course_lib.bench --engine continuous --model llama-1b-dummy --dtype bfloat16 \
          --workload "$W" --n "$N" --steps "$@" 2>&1 | grep -v "it/s\]\|req/s\]" \
        | grep -i "recompil\|tok/s\|error" | cut -c1-300 | tail -8; }
run --max-batch 64 --block-size 16 --attention flex --json "$OUT/flex_blocks_llama-1b-dummy_gpu.json"
run --max-batch 64 --block-size 16 --attention flex --max-num-batched-tokens 2048 \
    --json "$OUT/flex_chunked_llama-1b-dummy_gpu.json"
run --max-batch 64 --block-size 16 --attention gather --json "$OUT/gather_blocks_llama-1b-dummy_gpu.json"
run --max-batch 64 --json "$OUT/rows_llama-1b-dummy_gpu.json"
# the rows' KV memory (64 rows x 1024 tokens) as 4096 blocks of 16, shared by up to 256 sequences
run --max-batch 256 --block-size 16 --num-blocks 4096 --attention flex --max-num-batched-tokens 2048 \
    --json "$OUT/flex_same_memory_llama-1b-dummy_gpu.json"
