#!/usr/bin/env bash
# Here, once: vLLM 0.26.0 (the newest release built for the GPU machines' torch 2.11) and the wheels
# it needs there (vllm_wheels.txt), trimmed of what an H200 running a Llama never loads
# (FlashAttention-2, the Rust HTTP front end, deep_gemm for other Pythons) and split in four parts
# of at most 45 MiB, one per call (a call carries at most 64 MiB, the repository's ~7 MB included):
# .vllm_p1/part-aa ... .vllm_p4/part-ad (git-ignored). gpu_peers.sh joins and installs them on the
# GPU machine.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d); mkdir -p "$work/stage/vwhl"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_26_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  --platform any -d "$work/stage/vwhl" -r "$HERE/vllm_wheels.txt" 2>&1 | { grep -v 'is ignored' || true; }
V=$(ls "$work"/stage/vwhl/vllm-*.whl)
DROP=(vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so vllm/vllm-rs)
for py in 310 311 313 314; do DROP+=("vllm/third_party/deep_gemm/_C.cpython-$py-x86_64-linux-gnu.so"); done
zip -q -d "$V" "${DROP[@]}" || true
rec=$(unzip -Z1 "$V" | grep -E '^vllm-[^/]+\.dist-info/RECORD$')      # the wheel's RECORD, kept true
(cd "$work" && unzip -q -o "$V" "$rec" && pat=$(printf '%s\n' "${DROP[@]}" | sed 's/[.]/\\./g' | paste -sd'|') \
  && grep -v -E "^(${pat})," "$rec" > RECORD.new && mv RECORD.new "$rec" && zip -q "$V" "$rec")
unzip -tqq "$V"
tar -C "$work/stage" -cf "$work/bundle.tar" .
split -b 45M -a 2 "$work/bundle.tar" "$work/part-"
rm -rf .vllm_p*; i=0
for part in "$work"/part-*; do i=$((i + 1)); mkdir -p ".vllm_p$i"; mv "$part" ".vllm_p$i/"; done
[ "$i" = 4 ] || { echo "expected 4 parts, made $i: change the split size and gpu_peers.sh" >&2; exit 1; }
(sha256sum .vllm_p*/part-* | sed 's# .*/# #') > .vllm_p4/SHA256SUMS
rm -rf "$work"; ls -l .vllm_p*/
