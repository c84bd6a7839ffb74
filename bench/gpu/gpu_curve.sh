#!/usr/bin/env bash
# Chapter 08's throughput-latency curve on one GPU with every point run three times (the spread of
# identical runs, which the simulator's predictions are held to by their medians): the paged engine
# (FlexAttention, blocks of 16) on llama-1b-dummy (bf16), 128 anyscale requests, arrival rates
# 0 (all at once), 8, 16 and 32 req/s, at most 32, 64 and 128 sequences; then the probe
# `flex_in_run` (FlexAttention inside a real run against the same calls alone).
# About 8 minutes for the sweep on an H200: it runs in the background (setsid), a call waits up to
# $WAIT seconds and copies what is written; `bash bench/gpu/gpu_curve.sh --collect` in the next
# call (the machine still held) waits for the rest. See bench/gpu/README.md for COURSE_COMMIT.
set -uo pipefail
source "$(dirname "$0")/background.sh"
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
RUN=/tmp/curve WAIT=${WAIT:-560}
if [ "${1:-}" != "--collect" ]; then
  export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 COURSE_COMMIT=${COURSE_COMMIT:-unknown}
  [ -d .gpucarry/cache ] && export COURSE_CACHE=$PWD/.gpucarry/cache
  nvidia-smi --query-gpu=name,uuid,memory.total,driver_version --format=csv,noheader
  rm -rf "$RUN" && mkdir -p "$RUN"
  setsid nohup bash -c "
    python3 -m bench curve --model llama-1b-dummy --device cuda --dtype bfloat16 --n 128 \
      --workload anyscale:prompt_len=512,cap=512,mean=128 --rates 0 8 16 32 \
      --batches 32 64 128 --repeat 3 --out $RUN/curve_repeats_llama-1b-dummy_gpu.json.gz
    python3 -m bench flex_in_run --out $RUN
    echo done
  " > "$RUN/log" 2>&1 < /dev/null &
  echo $! > "$RUN/pid"
fi
wait_for "$RUN" "$WAIT"
sed 's/.*\r//' "$RUN/log" | grep -v "Warning\|WARNING" | tail -30
cp "$RUN"/*.json* "$OUT/" 2>/dev/null
still_running "$RUN" && echo "still running: bash bench/gpu/gpu_curve.sh --collect"
exit 0
