#!/usr/bin/env bash
# Every stored result measured on this machine's CPU, made again from a clean commit (the results
# record the commit; a tree with uncommitted changes marks it "+dirty", which tests refuse).
# Run it with the cores otherwise idle: it times real runs. About 20 minutes on 2 cores.
#   bash bench/gpu/cpu_results.sh
set -euo pipefail
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
  echo "commit first: the results must name a clean commit" >&2; exit 1
fi
PY=${PY:-.venv/bin/python}
R=bench/results
# chapter 04: the ladders on the CPU (notebook 04)
$PY -m bench run_ladder --workload chat --n 64 --max-batch 16 --max-new-tokens 128 --sequential-n 16 \
  --out $R/ladder_chat_smollm2-135m_cpu.json
$PY -m bench run_ladder --workload chat --n 64 --max-batch 16 --max-new-tokens 256 \
  --engines static continuous --out $R/ladder_chat256_smollm2-135m_cpu.json
$PY -m bench run_ladder --workload anyscale:prompt_len=64,cap=128,mean=32 --n 64 --max-batch 16 \
  --sequential-n 16 --out $R/ladder_anyscale-cpu_smollm2-135m_cpu.json
$PY -m bench.store $R/ladder_chat_smollm2-135m_cpu.json $R/ladder_chat256_smollm2-135m_cpu.json \
  $R/ladder_anyscale-cpu_smollm2-135m_cpu.json
# chapter 07: KV waste, rows against blocks (notebook 07)
bash bench/gpu/cpu_kv_waste.sh
$PY -m bench.store $R/cpu/kv_waste_*.json --drop requests --step-fields rows
# the simulator fitted to the H200 runs of chapters 05-07, from their full step logs (the
# stored files keep only each step's rows; the full ones are in git history)
FULL=70c0ad7 T=$(mktemp -d)
for v in rows gather flex flex_chunked flex_same_memory; do
  git show $FULL:$R/ch05-07_${v}_llama-1b-dummy_nvidia-h200.json > "$T/ch05-07_${v}_llama-1b-dummy_nvidia-h200.json"
done
$PY -m bench simulator_validation --fit $T/ch05-07_{rows,gather,flex}_llama-1b-dummy_nvidia-h200.json \
  --predict $T/ch05-07_{flex_chunked,flex_same_memory}_llama-1b-dummy_nvidia-h200.json \
  --out $R/simulator_nvidia-h200.json
$PY - "$R/simulator_nvidia-h200.json" "$FULL" <<'PY'
import json, sys, pathlib
f = pathlib.Path(sys.argv[1]); r = json.loads(f.read_text())
r["fit_sources"] = f"the files named, as stored at {sys.argv[2]} (git show {sys.argv[2]}:bench/results/<name>)"
f.write_text(json.dumps(r, indent=1) + "\n")
PY
# chapter 08: the throughput-latency curve and the simulator's validation on it
bash bench/gpu/cpu_simulator.sh
git status --short $R
