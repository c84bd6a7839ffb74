"""The step-cost model: seconds per forward pass from what the step moves and computes, fitted to
measured steps (the model itself is described in ``course_lib.measure.simulator``). The admission
policy predicts with it online; the simulator runs whole workloads on it."""
from __future__ import annotations

import itertools
from bisect import bisect
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import numpy as np

from course_lib.measure.metrics import Step, run_label
from course_lib.measure.roofline import step_work, weight_bytes

FEATURES = ("overhead", "per_row", "per_byte", "per_flop", "per_pair", "per_dense_pair")


def features(shape, dtype_bytes: int, rows: int, tokens: int, attended: int, kv_read: int,
             logit_rows: int) -> np.ndarray:
    """The cost model's inputs for one step: ``[1, rows, kv_bytes, flops, pairs, dense_pairs,
    weights]``; ``dense_pairs``: every query against every key of the step, what one masked
    attention over packed sequences computes (the gather path), growing as rows squared."""
    w = step_work(shape, dtype_bytes, tokens, attended, kv_read, logit_rows)
    weights = weight_bytes(shape, dtype_bytes)
    return np.array([1.0, rows, w.bytes - weights, w.flops, attended * shape.n_layers,
                     tokens * (kv_read + tokens) * shape.n_layers, weights])


def nonnegative_fit(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares in seconds (so that the fit gets a run's total time right: long prefill
    steps count as much as the many short decodes they replace), with every coefficient >= 0:
    the best of the fits over every subset of the columns."""
    best, best_err = np.zeros(X.shape[1]), np.inf
    for k in range(1, X.shape[1] + 1):
        for cols in itertools.combinations(range(X.shape[1]), k):
            c, *_ = np.linalg.lstsq(X[:, cols], y, rcond=None)
            if (c < 0).any():
                continue
            err = float(((X[:, cols] @ c - y) ** 2).sum())
            if err < best_err:
                best, best_err = np.zeros(X.shape[1]), err
                best[list(cols)] = c
    return best


@dataclass
class StepCost:
    """Seconds per step = the dot product of ``coef`` with ``features(...)``."""
    coef: dict                      # FEATURES -> seconds per unit
    device: str                     # the device whose steps it was fitted to
    bandwidth: float                # that device's measured peaks (bytes/s, FLOP/s)
    flops: float
    fitted_on: list = field(default_factory=list)
    transferred_from: str | None = None

    def predict(self, x: np.ndarray) -> float:
        return float(np.dot(x[:len(FEATURES)], [self.coef.get(k, 0.0) for k in FEATURES])
                     + x[len(FEATURES)] / self.bandwidth)

    @classmethod
    def floor(cls, device: str, bandwidth: float, flops: float) -> "StepCost":
        """The physical floor: every byte at the full bandwidth, every FLOP at the full rate,
        no host time. No engine is faster; how far one is from it is its overhead."""
        coef = dict(overhead=0.0, per_row=0.0, per_byte=1 / bandwidth, per_flop=1 / flops,
                    per_pair=0.0)
        return cls(coef, device, bandwidth, flops, ["the roofline"])

    @classmethod
    def fit_steps(cls, steps: list, shape, dtype_bytes: int, peaks, name: str = "") -> "StepCost":
        """Fit to logged steps (``Step`` records, or the ``steps`` rows of a bench JSON; those of
        whole runs: ``with_host_time``) measured on a device with ``peaks`` (``device``,
        ``bandwidth``, ``flops``; an infinite bandwidth leaves the weights to the fixed cost)."""
        steps = [Step(**s) if isinstance(s, dict) else s for s in steps]
        # every token position computed counts, padding included: it costs time even as waste
        X = np.array([features(shape, dtype_bytes, s.rows, s.slots, s.attended, s.kv_read,
                               s.logit_rows) for s in steps])
        y = np.array([s.seconds for s in steps]) - X[:, -1] / peaks.bandwidth   # beyond the weights
        names = name if isinstance(name, list) else [name] if name else []
        return cls(dict(zip(FEATURES, nonnegative_fit(X[:, :-1], y).tolist())), peaks.device,
                   peaks.bandwidth, peaks.flops, names)

    @classmethod
    def fit(cls, runs: list, shape, dtype_bytes: int) -> "StepCost":
        """Fit to the ``steps`` of bench results (JSON dicts) from one device."""
        devices = {r["device"]["device"] for r in runs}
        if len(devices) != 1:
            raise ValueError(f"fit one device at a time, got {sorted(devices)}")
        d = runs[0]["device"]
        peaks = SimpleNamespace(device=d["device"], bandwidth=d["bandwidth"], flops=d["flops"])
        return cls.fit_steps([s for r in runs for s in with_host_time(
            r["steps"], [q["arrival_s"] for q in r.get("requests", [])])], shape, dtype_bytes,
            peaks, [run_name(r) for r in runs])


def with_host_time(steps: list, arrivals: list) -> list:
    """A run's steps, each lengthened to the start of the next: the host's work between two steps
    (scheduling, bookkeeping) is part of a step's cost, except where one of the ``arrivals``
    falls in the gap (the engine may have been waiting for it)."""
    steps, arrivals = [Step(**s) if isinstance(s, dict) else s for s in steps], sorted(arrivals)
    return [s if bisect(arrivals, s.end_s) < bisect(arrivals, n.start_s) else replace(
        s, end_s=max(s.end_s, n.start_s)) for s, n in zip(steps, steps[1:])] + steps[-1:]


def run_name(result: dict) -> str:
    rate = result.get("arrival_rate")
    return f"{run_label(result)}, {result['workload']}, n={result['n']}" + (
        f", {rate:g} req/s" if rate else ", all at once")
