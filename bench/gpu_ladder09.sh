#!/usr/bin/env bash
# Chapter 09's ladder on one GPU, in one process: llama-1b-dummy (bf16) on the anyscale workload
# (512 requests, 512-token prompts, outputs capped at 512, EOS ignored). The padded engines and
# the peers at B=64; the paged rungs up to 512 sequences in the KV memory the padded rows
# reserve at B=64; then the fast rung beyond that (16 GiB of KV-cache, a budget of 16384 or 8192
# tokens a step, the second also without the host's overlap), the same memory at a budget of
# 8192, and the same-memory fast rung
# admitting only while 5% of the blocks stay free (the watermark against preemption). The JSON holds every run and the workload's physical
# floor on this card.
# The rungs run most telling first (the peer hf-cb before the fast rungs, on a clean card) and the
# JSON is rewritten after each, so a run cut short keeps what it measured; before each, what the
# rung before left is given back, and what is still held is recorded (memory_held_at_start_bytes);
# the notebook shows them in the ladder's order.
# Everything lands in $OUT; see bench/README.md for .gpucarry and COURSE_COMMIT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 COURSE_COMMIT=${COURSE_COMMIT:-unknown}
[ -d .gpucarry/cache ] && export COURSE_CACHE=$PWD/.gpucarry/cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
N=${N:-512}
python3 bench/ladder.py --model llama-1b-dummy --dtype bfloat16 --device cuda \
  --workload "anyscale:prompt_len=512,cap=512,mean=128" --n "$N" --max-batch 64 --big-batch 512 \
  --budget 2048 --no-tokens \
  --rungs static hf-cb "graphs:kv_memory_mib=16384,max_num_batched_tokens=16384" \
          "graphs:kv_memory_mib=16384,max_num_batched_tokens=8192" \
          "graphs:kv_memory_mib=16384,max_num_batched_tokens=8192,overlap=0" \
          "graphs:max_num_batched_tokens=8192" graphs "graphs:watermark=0.05" paged chunked \
          continuous hf-generate dynamic \
  --out "$OUT/ladder09_anyscale_llama-1b-dummy_gpu.json" 2>&1 | sed 's/.*\r//' 
