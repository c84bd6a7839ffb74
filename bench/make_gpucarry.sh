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
.venv/bin/python -c "from course_lib import models; models.load_tokenizer()"
cache=$(.venv/bin/python -c "from course_lib import models; print(models.cache_dir())")
cp "$cache"/smollm2-135m/{tokenizer.json,tokenizer_config.json,chat_template.jinja} .gpucarry/cache/smollm2-135m/
du -sh .gpucarry
