"""The throughput-latency trade-off (chapter 08): one row of metrics per operating point (arrival
rate, max batch), from real runs or the calibrated simulator (``simulated``). More of either knob
buys throughput and costs latency; past capacity the queue grows and time-to-first-token explodes.
"""
from __future__ import annotations

from functools import lru_cache

from course_lib.measure.metrics import summarize
from course_lib.requests import poisson_arrivals


def point(log, rate, max_batch, slo=None, **extra) -> dict:
    """The metrics of one operating point that the curves and tables use."""
    m = summarize(log, slo=slo)
    row = {"rate": rate, "max_batch": max_batch, **extra,
           "tokens_per_s": m["output_tokens_per_s"], "served": m["served"], "refused": m["refused"],
           "ttft_p50": m["ttft_s"]["p50"], "ttft_p99": m["ttft_s"]["p99"],
           "tpot_p50": m["tpot_s"]["p50"], "tpot_p99": m["tpot_s"]["p99"],
           "e2e_p50": m["e2e_s"]["p50"], "e2e_p99": m["e2e_s"]["p99"]}
    if slo is not None:
        row.update(goodput_rps=m["slo"]["goodput_rps"], attainment=m["slo"]["attainment"],
                   on_time=m["slo"]["met"], queue_depth_max=m["queue_depth_max"])
    return row


def simulated(book, shape, dtype_bytes: int, requests: list, engine: str = "continuous",
              seed: int = 0, **options):
    """A cached function ``run(rate, max_batch, slo=None) -> RunLog`` that simulates ``engine``
    on ``requests`` arriving as a Poisson process (``rate=None``: all at once). With an ``slo``
    the engine admits, queues and refuses to meet it."""
    from course_lib.measure.simulator import simulate

    @lru_cache(maxsize=None)
    def run(rate, max_batch, slo=None):
        reqs = poisson_arrivals(requests, rate, seed) if rate else requests
        opts = dict(options, **({"slo": slo} if slo is not None else {}))
        return simulate(engine, reqs, book, shape, dtype_bytes, max_batch, **opts)[1]
    return run


def sweep(run, rates, batches, slo=None, admission: bool = False) -> list:
    """``point`` for every rate and max batch; ``run(rate, max_batch[, slo])`` gives a RunLog."""
    rows = []
    for b in batches:
        for r in rates:
            log = run(r, b, slo) if admission else run(r, b)
            rows.append(point(log, r, b, slo, admission=admission))
    return rows
