"""The step-cost model: seconds per forward pass from what the step moves and computes, fitted to
measured steps (the model itself is described in ``course_lib.measure.simulator``). The admission
policy predicts with it online; the simulator runs whole workloads on it."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from course_lib.measure.metrics import Step, run_label
from course_lib.measure.roofline import step_work, weight_bytes

FEATURES = ("overhead", "per_row", "per_byte", "per_flop", "per_pair")


def features(shape, dtype_bytes: int, rows: int, tokens: int, attended: int, kv_read: int,
             logit_rows: int) -> np.ndarray:
    """The cost model's inputs for one step: ``[1, rows, kv_bytes, flops, pairs, weights]``."""
    w = step_work(shape, dtype_bytes, tokens, attended, kv_read, logit_rows)
    weights = weight_bytes(shape, dtype_bytes)
    return np.array([1.0, rows, w.bytes - weights, w.flops, attended * shape.n_layers, weights])


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
        return float(np.dot(x[:len(FEATURES)], [self.coef[k] for k in FEATURES])
                     + x[len(FEATURES)] / self.bandwidth)

    @property
    def efficiency(self) -> dict:
        """Effective bandwidth and FLOP rate as shares of the measured peaks."""
        b, f = self.coef["per_byte"], self.coef["per_flop"]
        return {"bandwidth": 1 / b / self.bandwidth if b > 0 else None,
                "flops": 1 / f / self.flops if f > 0 else None}

    def on(self, device: str, bandwidth: float, flops: float) -> "StepCost":
        """The same efficiencies on another device's peaks. The per-step and per-row times are
        host-side work (Python, kernel launches) and are kept as they are: a guess, said so.
        Attention's extra cost per pair is taken to scale with bandwidth (it reads K and V)."""
        coef = dict(self.coef, per_byte=self.coef["per_byte"] * self.bandwidth / bandwidth,
                    per_flop=self.coef["per_flop"] * self.flops / flops,
                    per_pair=self.coef["per_pair"] * self.bandwidth / bandwidth)
        return StepCost(coef, device, bandwidth, flops, self.fitted_on, self.device)

    @classmethod
    def floor(cls, device: str, bandwidth: float, flops: float) -> "StepCost":
        """The physical floor: every byte at the full bandwidth, every FLOP at the full rate,
        no host time. No engine is faster; how far one is from it is its overhead."""
        coef = dict(overhead=0.0, per_row=0.0, per_byte=1 / bandwidth, per_flop=1 / flops,
                    per_pair=0.0)
        return cls(coef, device, bandwidth, flops, ["the roofline"])

    @classmethod
    def fit_steps(cls, steps: list, shape, dtype_bytes: int, peaks, name: str = "") -> "StepCost":
        """Fit to logged steps (``Step`` records, or the ``steps`` rows of a bench JSON) measured
        on a device with ``peaks`` (``device``, ``bandwidth``, ``flops``; an infinite bandwidth
        leaves the weights to the fitted fixed cost)."""
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
        return cls.fit_steps([s for r in runs for s in r["steps"]], shape, dtype_bytes, peaks,
                             [run_name(r) for r in runs])


def run_name(result: dict) -> str:
    return f"{run_label(result)}, {result['workload']}, n={result['n']}"
