#!/usr/bin/env bash
# Unequal context lengths in one call (about 8 minutes on an H200; no model weights): the decode
# kernel alone on equal and lognormal lengths at several caps on a split's tokens
# (decode_lengths), then the lognormal workload's fast rung without and with the cap
# (CAP tokens, 512 unless set), each run a process of its own, interleaved, twice.
#
#   COURSE_COMMIT=$(git rev-parse --short HEAD) bash bench/gpu/gpu_lengths.sh     # on the GPU
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 COURSE_COMMIT=${COURSE_COMMIT:-unknown}
[ -d .gpucarry/cache ] && export COURSE_CACHE=$PWD/.gpucarry/cache
nvidia-smi --query-gpu=name,uuid,memory.total,driver_version --format=csv,noheader
timeout 200 python3 -m bench decode_lengths --longest-split 0 256 512 1024 --out "$OUT" 2>&1 |
  tail -40
RUNG=fast:kv_memory_mib=16384,max_num_batched_tokens=16384
for i in 1 2; do
  for knobs in "" "longest_split=${CAP:-512}"; do
    timeout 150 python3 -m bench run_ladder --model llama-1b-dummy --dtype bfloat16 --device cuda \
      --workload lognormal --n 500 --max-batch 64 --big-batch 512 --no-tokens --rungs $RUNG \
      --decode-knobs "$knobs" --out "$OUT/lognormal_${knobs:-default}_$i.json" 2>&1 | tail -2
  done
done
