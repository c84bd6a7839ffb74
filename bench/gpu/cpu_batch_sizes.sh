#!/usr/bin/env bash
# Decode step time, tokens/s and MBU of smollm2-135m at B = 1, 8, 64 on this machine, through the
# bench CLI: one static batch of B requests with 64-token prompts and exactly 32 output tokens.
set -euo pipefail
OUT=${OUT:-/tmp/cpu-out}     # read by no notebook: kept out of bench/results
mkdir -p "$OUT"
for B in 1 8 64; do
  .venv/bin/python -m course_lib.bench --engine static --model smollm2-135m \
    --workload "anyscale:prompt_len=64,cap=32,mean=100000" --n "$B" --max-batch "$B" \
    --json "$OUT/batch_size_B$B.json"
done
.venv/bin/python - "$OUT" <<'PY'
import json, sys, pathlib
for B in (1, 8, 64):
    r = json.loads((pathlib.Path(sys.argv[1]) / f"batch_size_B{B}.json").read_text())
    m = r["metrics"]
    print(f"B={B:>2}: decode step p50 {m['step_time_s']['p50'] * 1e3:6.1f} ms, "
          f"{m['output_tokens_per_s']:6.1f} tok/s, MBU {100 * m['mbu']:4.1f}%, MFU {100 * m['mfu']:4.1f}% "
          f"({r['device']['device']})")
PY
