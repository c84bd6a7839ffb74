#!/usr/bin/env bash
# Chapter 09's ladder on one GPU, in one process: llama-1b-dummy (bf16) on the anyscale workload
# (512 requests, 512-token prompts, outputs capped at 512, EOS ignored). The padded engines and
# the peers at B=64; the paged rungs up to 512 sequences in the KV memory the padded rows
# reserve at B=64; then the fast rung beyond that (16 GiB of KV-cache, a budget of 16384 or 8192
# tokens a step, the second also without the host's overlap), the same memory at a budget of
# 8192, and the same-memory fast rung
# admitting only while 5% of the blocks stay free (the watermark against preemption). The JSON holds every run and the workload's physical
# floor on this card.
# hf-cb runs at 64 requests per batch, as the padded engines, and at 512, the fast rungs'
# batch (its KV-cache sized by HF from the free memory), the peer a serving engineer would set
# against a batch of 512. Both also run with HF's KV-cache at half the free memory
# (max_memory_percent=0.5; HF's default, 0.9, leaves too little for its CUDA-graph warm-up on an
# H200, which it then skips: the JSON counts those warm-ups in metrics.warmup_failures).
# The rungs run most telling first (the peer hf-cb before the fast rungs, on a clean card) and the
# JSON is rewritten after each, so a run cut short keeps what it measured; before each, what the
# rung before left is given back, and what is still held is recorded (memory_held_at_start_bytes);
# the notebook shows them in the ladder's order.
# The rungs are course_lib.measure.ladder.LADDER_09 (notebook 09 runs the same list with full_ladder).
# Everything lands in $OUT; see bench/gpu/README.md for .gpucarry and COURSE_COMMIT.
set -uo pipefail
source "$(dirname "$0")/background.sh"
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
# The run takes about 9.5 minutes on an H200, close to the device tool's 10 minutes per command, so
# it runs in the background (setsid) and this call waits up to $WAIT seconds; if it is not done,
# `bash bench/gpu/gpu_ladder09.sh --collect` in the next call (the machine still held) waits for the
# rest. Each call copies the JSON (rewritten whole after every rung) to $OUT.
# RUNGS="static hf-cb ..." runs only those rungs (a shorter check, say the peers against the fast
# rung), and TAG=name writes ladder09-name_..._gpu.json (give --collect the same TAG).
RUN=/tmp/ladder09 WAIT=${WAIT:-570} NAME=ladder09${TAG:+-$TAG}_anyscale_llama-1b-dummy_gpu.json
PY=${PY:-python3}
ALL=$(PYTHONPATH=$PWD $PY -c "from course_lib.measure.ladder import LADDER_09; print(*LADDER_09)")  # the library's list
read -r -a RUNG_LIST <<< "${RUNGS:-$ALL}"
if [ "${1:-}" != "--collect" ]; then
  export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 COURSE_COMMIT=${COURSE_COMMIT:-unknown}
  [ -d .gpucarry/cache ] && export COURSE_CACHE=$PWD/.gpucarry/cache
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  N=${N:-512}
  rm -rf "$RUN" && mkdir -p "$RUN"
  setsid nohup $PY -m bench run_ladder --model llama-1b-dummy --dtype bfloat16 --device cuda \
    --workload "anyscale:prompt_len=512,cap=512,mean=128" --n "$N" --max-batch 64 --big-batch 512 \
    --max-num-batched-tokens 2048 --no-tokens \
    --rungs "${RUNG_LIST[@]}" \
    --out "$RUN/$NAME" > "$RUN/log" 2>&1 < /dev/null &
  echo $! > "$RUN/pid"
fi
wait_for "$RUN" "$WAIT"
sed 's/.*\r//' "$RUN/log" | grep -v "Warning\|WARNING\|Graph pool" | tail -18
[ -f "$RUN/$NAME" ] && cp "$RUN/$NAME" "$OUT/"
if still_running "$RUN"; then
  echo "still running: collect the rest with 'bash bench/gpu/gpu_ladder09.sh --collect' (within the machine's idle time)"
fi
