#!/usr/bin/env bash
# The fast engine at this commit against another commit's, on one card, one after the other:
# did a change of code change its speed? llama-1b-dummy (bf16) on chapter 09's anyscale workload
# (512 requests), the rung `fast:kv_memory_mib=16384,max_num_batched_tokens=16384` (before the
# engines had one name each: `graphs:...`). Each run is a process of its own, interleaved
# (old, new, old, new) so that a drift of the card shows; the last new one runs hf-cb first, as
# the ladder does, for the ratio to the peer in the same process.
#
#   git archive OLD_COMMIT course_lib bench/ladder.py | tar -x -C .gpucarry/old    # here
#   (a commit with bench/run_ladder.py: git archive OLD_COMMIT course_lib 'bench/*.py')
#   OLD=.gpucarry/old OLD_COMMIT=... bash bench/gpu/gpu_compare.sh                 # on the GPU
#   bash bench/gpu/gpu_compare.sh --collect          # next call, if the first ran out of time
#
# The runs go on in the background (setsid): a call waits up to $WAIT seconds, then copies the
# JSON written so far to $OUT (new_1.json, old_1.json, ...).
set -uo pipefail
source "$(dirname "$0")/background.sh"
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
RUN=/tmp/compare WAIT=${WAIT:-540}
if [ "${1:-}" != "--collect" ]; then
  : "${OLD:?OLD=checkout of the other commit}" "${OLD_COMMIT:?OLD_COMMIT=its commit}"
  [ -d .gpucarry/cache ] && export COURSE_CACHE=$PWD/.gpucarry/cache
  export PYTHONUNBUFFERED=1 COURSE_COMMIT=${COURSE_COMMIT:-unknown}
  nvidia-smi --query-gpu=name,uuid,memory.total,driver_version --format=csv,noheader
  rm -rf "$RUN" && mkdir -p "$RUN"
  W="anyscale:prompt_len=512,cap=512,mean=128"
  ARGS="--model llama-1b-dummy --dtype bfloat16 --device cuda --workload $W --n 512"
  ARGS="$ARGS --max-batch 64 --big-batch 512 --no-tokens"
  OLD_RUNG="graphs:kv_memory_mib=16384,max_num_batched_tokens=16384"
  NEW_RUNG="fast:kv_memory_mib=16384,max_num_batched_tokens=16384"
  setsid nohup bash -c "
    old() { if [ -f $OLD/bench/run_ladder.py ]; then    # a commit of the split engine
              (cd $OLD && PYTHONPATH=\$PWD COURSE_COMMIT=$OLD_COMMIT python3 -m bench run_ladder \
               $ARGS --rungs $NEW_RUNG --out $RUN/old_\$1.json)
            else
              (cd $OLD && PYTHONPATH=\$PWD COURSE_COMMIT=$OLD_COMMIT python3 bench/ladder.py $ARGS \
               --budget 2048 --rungs $OLD_RUNG --out $RUN/old_\$1.json)
            fi; }
    new() { PYTHONPATH=$PWD python3 -m bench run_ladder $ARGS --rungs \$2 $NEW_RUNG \
             --out $RUN/new_\$1.json; }
    old 1; new 1; old 2; new 2 hf-cb; echo done
  " > "$RUN/log" 2>&1 < /dev/null &
  echo $! > "$RUN/pid"
fi
wait_for "$RUN" "$WAIT"
sed 's/.*\r//' "$RUN/log" | grep -E "tok/s|floor|wrote|done|Error|error" | tail -20
cp "$RUN"/*.json "$OUT/" 2>/dev/null
still_running "$RUN" && echo "still running: bash bench/gpu/gpu_compare.sh --collect"
exit 0
