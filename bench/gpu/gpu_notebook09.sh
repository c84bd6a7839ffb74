#!/usr/bin/env bash
# Notebook 09 on a GPU, through papermill with its default parameters: its live branch (the
# short ladder, measured there), the CPU checks, and the stored results next to them. The
# executed notebook lands in $OUT as 09_cuda_engine.<card>.ipynb, the evidence that it runs there.
# It needs SmolLM2 (section 3 loads it): run it in the third call of bench/gpu/gpu_smollm2_parts.sh,
#   source bench/gpu/gpu_smollm2_parts.sh 3 && bash bench/gpu/gpu_notebook09.sh
# carrying .gpucarry_p3 and .gpucarry (the tokenizer and the wheels papermill needs).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 COURSE_COMMIT=${COURSE_COMMIT:-unknown}
if [ -d .gpucarry/whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpucarry/whl/*.whl
fi
export PYTHONPATH=/tmp/site:/tmp/smol/site:$PWD
[ -d .gpucarry/cache ] && export COURSE_CACHE=$PWD/.gpucarry/cache
card=$(python3 -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
python3 -m papermill notebooks/09_cuda_engine.ipynb "$OUT/09_cuda_engine.$card.ipynb" --cwd notebooks \
  "$@" 2>&1 | tail -5
echo "papermill exit: ${PIPESTATUS[0]}"
