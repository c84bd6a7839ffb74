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
    """Display the source of a library function or class: a notebook shows the code it runs."""
    from IPython.display import Code, display
    display(Code(inspect.getsource(obj), language="python"))


def has_gpu() -> bool:
    return torch.cuda.is_available()


def read_result(path) -> dict:
    """A result JSON at ``path``, gzipped or not (by its ``.gz`` suffix)."""
    path = Path(path)
    data = path.read_bytes()
    return json.loads(gzip.decompress(data) if path.suffix == ".gz" else data)


def load_result(name: str) -> dict:
    """A stored result from ``bench/results/`` by its JSON file name, or gzipped (``name.gz``)."""
    path = RESULTS / name
    return read_result(path if path.exists() else RESULTS / f"{name}.gz")


def stored_results(prefix: str) -> list:
    """The stored results whose file names start with ``prefix``, gzipped or not, by name."""
    paths = [*RESULTS.glob(f"{prefix}*.json"), *RESULTS.glob(f"{prefix}*.json.gz")]
    return [read_result(p) for p in sorted(paths, key=lambda p: p.name.removesuffix(".gz"))]
