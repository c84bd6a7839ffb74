#!/usr/bin/env bash
# The GPU half of the foundation chapter, in one call on a GPU machine (see bench/gpu/README.md):
# chapter 01's batch sweep with llama-1b-dummy, the bench CLI's engines, and notebook 01 run
# through papermill with GPU parameters. Everything lands in $OUT.
#
# Packages missing on the GPU image (papermill, ipykernel, ...) travel as wheels in .gpucarry/whl,
# and the SmolLM2 tokenizer in .gpucarry/cache (bench/gpu/README.md says how to make both).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if [ -d .gpucarry/whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpucarry/whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
[ -d .gpucarry/cache ] && export COURSE_CACHE=$PWD/.gpucarry/cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"

export COURSE_COMMIT=${COURSE_COMMIT:-unknown}
BATCHES="1 2 4 8 16 32 64 128 256 512"
python3 -m bench ch01_batch_sweep --model llama-1b-dummy --dtype bfloat16 --device cuda \
  --batch $BATCHES --context 512 --prefill 2048 --repeat 20 --out "$OUT" 2>&1 | grep -v "it/s"

W="anyscale:prompt_len=512,cap=512,mean=128"
python3 -m course_lib.bench --engine sequential --model llama-1b-dummy --dtype bfloat16 \
  --workload "$W" --n 8 --max-batch 1 --json "$OUT/foundation_sequential.json" 2>&1 | grep -v "it/s\]"
for e in hf-generate hf-cb; do
  python3 -m course_lib.bench --engine $e --model llama-1b-dummy --dtype bfloat16 \
    --workload "$W" --n 128 --max-batch 64 --json "$OUT/foundation_$e.json" 2>&1 | grep -v "it/s\]" | tail -5
done

python3 -m papermill notebooks/01_memory_bound_inference.ipynb "$OUT/01_memory_bound_inference.gpu.ipynb" \
  --cwd notebooks -p model_name llama-1b-dummy -p device cuda -p dtype bfloat16 \
  -y "batch_sizes: [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]" -p context 512 -p prefill_tokens 2048 \
  -p repeat 10 2>&1 | tail -3
echo "papermill exit: $?"
