"""Small helpers the notebooks share: show library code, find stored GPU results."""
from __future__ import annotations

import gzip
import inspect
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]       # the repository
RESULTS = ROOT / "bench" / "results"


def show_source(obj):
    """Display the source of a library function or class: the notebook shows the code it runs
    without keeping a copy of it."""
    from IPython.display import Code, display
    display(Code(inspect.getsource(obj), language="python"))


def has_gpu() -> bool:
    return torch.cuda.is_available()


def load_result(name: str) -> dict:
    """A stored result from ``bench/results/`` by its JSON file name; earlier runs kept for
    comparison are stored gzipped (``name + ".gz"``), which this reads the same way."""
    path = RESULTS / name
    if path.exists():
        return json.loads(path.read_text())
    return json.loads(gzip.decompress((RESULTS / f"{name}.gz").read_bytes()))


def stored_results(prefix: str) -> list:
    """Every stored result in ``bench/results/`` whose file name starts with ``prefix``."""
    return [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"{prefix}*.json"))]
