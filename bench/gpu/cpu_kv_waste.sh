#!/usr/bin/env bash
# Chapter 07's memory measurement on this machine, at answers long enough to show the regime of the
# published anchor (60-80% of KV memory wasted by max-length reservation): the whole chat workload
# with answers capped at 256 tokens, continuous batching with contiguous rows (each row reserves
# the longest prompt + 256) against blocks of 16, then blocks of 16 in the rows' memory with a
# larger batch. Run it with nothing else busy on the CPU.
set -euo pipefail
OUT=${OUT:-bench/results/cpu}
mkdir -p "$OUT"
run() { .venv/bin/python -m course_lib.bench --engine continuous --model smollm2-135m --workload chat \
          --max-new-tokens 256 --steps "$@"; }
run --max-batch 16 --json "$OUT/kv_waste_rows.json"
run --max-batch 16 --block-size 16 --json "$OUT/kv_waste_blocks.json"
# the rows' memory: 16 rows x (50-token longest prompt + 256) = 4896 token places = 306 blocks of 16
run --max-batch 64 --block-size 16 --num-blocks 306 --json "$OUT/kv_waste_blocks_same_memory.json"
.venv/bin/python - "$OUT" <<'PY'
import json, sys, pathlib
for name in ("rows", "blocks", "blocks_same_memory"):
    r = json.loads((pathlib.Path(sys.argv[1]) / f"kv_waste_{name}.json").read_text())
    m = r["metrics"]
    print(f"{name:>18}: KV waste {100 * m['kv_waste']:5.1f}%, peak reserved {m['kv_tokens_reserved_peak']:5d} "
          f"token places, largest batch {max(s['rows'] for s in r['steps']):3d}, "
          f"{m['output_tokens_per_s']:6.1f} tok/s, preemptions {m.get('preemptions')} ({r['device']['device']})")
PY
