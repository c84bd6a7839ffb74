#!/usr/bin/env bash
# vLLM beside the course's fastest engine and hf-cb, on the same requests on one card: llama-1b-dummy
# (bf16) on anyscale (512 requests) and on the lognormal workload (500 requests). vLLM runs first
# and in a process of its own (course_lib.engines.vllm), at its H200 defaults (1024 sequences, a
# budget of 16384 tokens, engine core in a second process), with its engine core in-process, and
# at 512 sequences; then `fast` (KV-cache: 16 GiB for the 1B, 80 GiB for the 8B), then hf-cb.
# vLLM's wheels travel in four parts made here by bench/gpu/make_vllm_parts.sh, one per call, in
# consecutive calls (the machine keeps /tmp while it is held):
#   bash bench/gpu/gpu_peers.sh carry 1      # carries .vllm_p1 (then 2 and 3 the same way)
#   bash bench/gpu/gpu_peers.sh run          # carries .vllm_p4 (and .gpucarry): installs, starts
#   bash bench/gpu/gpu_peers.sh --collect    # waits for the rest, copies the JSON to $OUT
# The runs take longer than one call's 10 minutes, so they go in the background (setsid).
# WORKLOADS="anyscale" or "lognormal" runs one, "prefix" the shared-prefix workload (PREFIX_RUNGS);
# MODEL=llama-8b-dummy the bigger model.
set -uo pipefail
source "$(dirname "$0")/background.sh"
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT" /tmp/vparts
RUN=/tmp/peers WAIT=${WAIT:-560} MODEL=${MODEL:-llama-1b-dummy}
# the fast engine's KV-cache, per model: 16 GiB hold 512k tokens of the 1B (32 KiB each) but only
# 128k of the 8B (128 KiB each), where it fell to 3,427 tok/s; 80 GiB sit beside the 8B's 15 GiB
# vLLM starts while the ladder holds our copy of the weights on the card (15 GiB for the 8B) and
# refuses to start unless gpu_memory_utilization (0.9) of the card is free: 0.85 for the 8B
case $MODEL in llama-8b-dummy) KV=${KV_MIB:-81920} V=",gpu_memory_utilization=0.85" ;;
                            *) KV=${KV_MIB:-16384} V="" ;; esac
RUNGS=("vllm:max_batch=1024,in_process=0$V" "vllm:max_batch=1024$V" "vllm:max_batch=512$V"
       "fast:kv_memory_mib=$KV,max_num_batched_tokens=16384" "hf-cb")
# shared prefixes (8 system prompts of 1,024 tokens, 64-token questions): each engine with and
# without prefix caching
PREFIX_RUNGS=("vllm:max_batch=1024,prefix_caching=1$V" "vllm:max_batch=1024,prefix_caching=0$V"
              "fast:kv_memory_mib=$KV,max_num_batched_tokens=16384,prefix_caching=1"
              "fast:kv_memory_mib=$KV,max_num_batched_tokens=16384,prefix_caching=0" "hf-cb")
case ${1:?carry N, run or --collect} in
  carry) cp ".vllm_p$2"/* /tmp/vparts/ && ls -l /tmp/vparts; exit ;;
  run)
    cp .vllm_p4/* /tmp/vparts/
    (cd /tmp/vparts && sha256sum -c SHA256SUMS) || exit 1
    rm -rf /tmp/vw && mkdir -p /tmp/vw && cat /tmp/vparts/part-* | tar -x -C /tmp/vw
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/vsite /tmp/vw/vwhl/*.whl \
      2>&1 | tail -2
    export PYTHONPATH=$PWD:/tmp/vsite PYTHONUNBUFFERED=1 COURSE_COMMIT=${COURSE_COMMIT:-unknown}
    [ -d .gpucarry/cache ] && export COURSE_CACHE=$PWD/.gpucarry/cache
    python3 -c "import vllm; print('vllm', vllm.__version__)" 2>&1 | tail -1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    rm -rf "$RUN" && mkdir -p "$RUN"
    cat > "$RUN/go.sh" <<GO
for w in ${WORKLOADS:-anyscale lognormal}; do
  rungs="${RUNGS[*]}"
  case \$w in anyscale) spec="anyscale:prompt_len=512,cap=512,mean=128" n=512 ;;
              prefix) spec="prefix:prefixes=8,prefix_len=1024,question_len=64" n=512
                      rungs="${PREFIX_RUNGS[*]}" ;;
              *) spec=lognormal n=500 ;; esac
  python3 -m bench run_ladder --model $MODEL --dtype bfloat16 --device cuda --workload "\$spec" \
    --n \$n --max-batch 64 --big-batch 512 --no-tokens --rungs \$rungs \
    --out "$RUN/peers_\${w}_$MODEL.json"
done
GO
    setsid nohup bash "$RUN/go.sh" > "$RUN/log" 2>&1 < /dev/null &
    echo $! > "$RUN/pid" ;;
  --collect) ;;
esac
wait_for "$RUN" "$WAIT"
sed 's/.*\r//' "$RUN/log" | grep -v "Warning\|WARNING\|Graph pool\|INFO" | tail -30
cp "$RUN"/peers_*.json "$OUT/" 2>/dev/null
cp "$RUN/log" "$OUT/peers.log"
still_running "$RUN" && echo "still running: 'bash bench/gpu/gpu_peers.sh --collect' in the next call"
exit 0
