#!/usr/bin/env bash
# Chapter 09's fast path on a GPU, piece by piece: the Triton decode kernel's bf16 check, one
# layer of decode attention (gather / FlexAttention / kernel), whole decode steps as CUDA graphs
# vs eager per batch size, and the fast engine on the full anyscale workload in a few settings.
# Everything lands in $OUT; see bench/README.md for .gpucarry and COURSE_COMMIT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/tests PYTHONUNBUFFERED=1 COURSE_COMMIT=${COURSE_COMMIT:-unknown}
[ -d .gpucarry/cache ] && export COURSE_CACHE=$PWD/.gpucarry/cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider tests/test_paged_decode.py 2>&1 | tail -3
python3 bench/paged_attention.py --device cuda --dtype bfloat16 --batch 64 256 --out "$OUT" 2>&1 | grep -v Warning
python3 bench/decode_step.py --out "$OUT" 2>&1 | grep -v Warning
W="anyscale:prompt_len=512,cap=512,mean=128"
python3 bench/ladder.py --model llama-1b-dummy --dtype bfloat16 --device cuda --workload "$W" \
  --n 512 --max-batch 64 --big-batch 512 --no-tokens \
  --rungs graphs "graphs:max_num_batched_tokens=8192" "graphs:kv_memory_mib=16384,max_num_batched_tokens=8192" \
  "graphs:cuda_graphs=0,max_num_batched_tokens=8192" \
  --out "$OUT/fast_anyscale_llama-1b-dummy_gpu.json" 2>&1 | grep "|\|wrote\|Error\|error"
python3 bench/ladder.py --model llama-1b-dummy --dtype bfloat16 --device cuda --workload "$W" \
  --n 64 --max-batch 64 --big-batch 64 --rungs chunked graphs \
  --out "$OUT/agree_anyscale_llama-1b-dummy_gpu.json" 2>&1 | grep "|\|wrote\|Error\|error"
python3 - "$OUT/agree_anyscale_llama-1b-dummy_gpu.json" <<'PY'
import json, sys
a, b = json.load(open(sys.argv[1]))["runs"]
same = [x["output_tokens"] == y["output_tokens"] for x, y in zip(a["requests"], b["requests"])]
tok = sum(p == q for x, y in zip(a["requests"], b["requests"]) for p, q in zip(x["output_tokens"], y["output_tokens"]))
print(f"flex vs kernel+graphs: {sum(same)}/{len(same)} requests identical, {tok}/{sum(len(x['output_tokens']) for x in a['requests'])} tokens at equal positions")
PY
