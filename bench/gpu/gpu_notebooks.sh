#!/usr/bin/env bash
# The lessons on a GPU, as a learner with one would run them: each notebook through papermill
# with device="cuda" in its parameters (float32, so that the checks against Hugging Face's greedy
# tokens still hold; notebook 09 with its own defaults: its live branch, the short ladder), one
# after the other, each at most $NB_TIMEOUT seconds; $PARAMS goes to papermill as well (e.g.
# PARAMS="-p full_ladder True" with 09 alone). Prints a table (notebook, papermill's exit,
# seconds, the first error) and leaves the executed notebooks in $OUT as <name>.<card>.ipynb.
# It needs SmolLM2: run it in the third call of bench/gpu/gpu_smollm2_parts.sh,
#   source bench/gpu/gpu_smollm2_parts.sh 3 && bash bench/gpu/gpu_notebooks.sh [00 01 ... 09]
# carrying .gpucarry_p3 and .gpucarry (the tokenizer and the wheels papermill needs); 00-08 when
# none are named (a command there has 10 minutes: split the list if need be).
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
table=()
for n in ${@:-00 01 02 03 04 05 06 07 08}; do       # 09 when named (its ladder takes minutes)
  nb=$(ls notebooks/${n}_*.ipynb) || continue
  name=$(basename "$nb" .ipynb)
  start=$(date +%s)
  device=(-p device cuda); [ "$n" = 09 ] && device=()        # 09 finds the GPU itself
  timeout "${NB_TIMEOUT:-240}" python3 -m papermill "$nb" "$OUT/$name.$card.ipynb" --cwd notebooks \
    "${device[@]}" ${PARAMS:-} > "$OUT/$name.log" 2>&1
  rc=$?
  error=$(grep -m1 -E "^[A-Za-z]*(Error|Exception)|Traceback" "$OUT/$name.log" | cut -c1-100)
  table+=("$(printf '%-32s exit %3s  %4s s  %s' "$name" "$rc" "$(( $(date +%s) - start ))" "$error")")
done
printf '%s\n' "${table[@]}"
