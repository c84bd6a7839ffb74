"""Small helpers the notebooks share: show library code, find stored GPU results."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def show_source(obj):
    """Display the source of a library function or class: the notebook shows the code it runs
    without keeping a copy of it."""
    from IPython.display import Code, display
    display(Code(inspect.getsource(obj), language="python"))


def has_gpu() -> bool:
    return torch.cuda.is_available()


def stored_results(prefix: str) -> list:
    """Every stored result in ``bench/results/`` whose file name starts with ``prefix``."""
    return [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"{prefix}*.json"))]
