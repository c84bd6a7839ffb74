#!/usr/bin/env bash
# The simulator's validation on this machine's CPU (notebook 08): real runs of the paged engine on
# the same chat requests over arrival rates and batch sizes (bench/curve.py), then the step-cost
# model fitted to the runs at B=2 and B=32, all at once and at 2 req/s, predicting the others
# (B=8 at every rate: another batch size; 1, 4 and 8 req/s: other arrival rates); then the point
# at the knee (B=8, 4 req/s) five times over: how far identical runs spread there.
# Run it with the cores otherwise idle, from a clean commit. About 30 minutes on 2 cores.
#   bash bench/gpu/cpu_simulator.sh
set -euo pipefail
if [ -n "$(git status --porcelain --untracked-files=no -- . ':(exclude)bench/results')" ]; then
  echo "commit first: the results must name a clean commit" >&2; exit 1
fi
# One thread: with two on these two cores, whatever else runs stalls a matmul at its barrier, and
# the same saturated run varied by a fifth (bench/FINDINGS.md).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PY:-.venv/bin/python}
R=bench/results/cpu
$PY -m bench curve --rates 0 1 2 4 8 --batches 2 8 32 --out $R/curve_smollm2-135m_cpu.json.gz
$PY -m bench simulator_validation --fit $R/curve_smollm2-135m_cpu.json.gz \
  --where max_batch=2,32 --where arrival_rate=None,2 --out $R/simulator_cpu.json
$PY -m bench curve --rates 4 --batches 8 --repeat 5 --out $R/knee_smollm2-135m_cpu.json.gz
# The same sweep with every point run three times, fitted the same way (on the repeats of the
# fitted points), each other point's prediction held to the median of its three runs.
$PY -m bench curve --rates 0 1 2 4 8 --batches 2 8 32 --repeat 3 \
  --out $R/curve_repeats_smollm2-135m_cpu.json.gz
$PY -m bench simulator_validation --fit $R/curve_repeats_smollm2-135m_cpu.json.gz --medians \
  --where max_batch=2,32 --where arrival_rate=None,2 --out $R/simulator_cpu_repeats.json
