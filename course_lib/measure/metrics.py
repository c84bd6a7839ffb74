"""What a run records, and the numbers computed from it. Every engine returns a ``RunLog``: one
``RequestRecord`` per request (its arrival, the time of every output token, how it finished) and
one ``Step`` per forward pass (the token slots it computed, and which were useful).

* TTFT (time to first token) = first token time - arrival
* TPOT (time per output token) = (last token time - first token time) / (output tokens - 1)
* end-to-end latency = finish - arrival
* throughput = output tokens / (last finish - first arrival)
* slot utilisation = useful token slots / token slots computed
* MBU and MFU, from the bytes and FLOPs each step must move and do (``roofline.step_work``)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import accumulate

import numpy as np

from course_lib.measure.roofline import pair_counts, step_work
from course_lib.model.kv_cache import kv_bytes_per_token


@dataclass
class RequestRecord:
    id: str
    arrival_s: float
    prompt_len: int
    output_tokens: list = field(default_factory=list)
    token_times: list = field(default_factory=list)   # seconds since the run started, one per token
    finish_s: float | None = None
    finish_reason: str | None = None                   # "eos", "length" or "refused"
    error: str | None = None                           # why a refused request was refused

    def emit(self, token: int, now: float):
        self.output_tokens.append(int(token))
        self.token_times.append(now)

    def finish(self, reason: str, now: float):
        self.finish_reason, self.finish_s = reason, now

    @property
    def ttft_s(self):
        return self.token_times[0] - self.arrival_s if self.token_times else None

    @property
    def e2e_s(self):
        return None if self.finish_s is None else self.finish_s - self.arrival_s

    @property
    def gaps_s(self) -> list:
        """Inter-token latencies: the wait between consecutive tokens of this request."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def tpot_s(self):
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n >= 2 else None


@dataclass
class Step:
    """One forward pass: the token slots it computed (padding included), and the useful part."""
    start_s: float
    end_s: float
    rows: int                 # sequences (batch rows) in the forward pass
    slots: int                # token positions computed, padding and finished rows included
    prefill_tokens: int       # useful prompt tokens
    decode_tokens: int        # useful generated tokens fed back in
    attended: int             # useful (query, key) pairs
    kv_read: int              # cached tokens of live sequences read
    logit_rows: int           # useful logits computed
    active: list = field(default_factory=list)   # ids of the requests with useful work
    held: list = field(default_factory=list)     # ids of finished requests still holding a row
    kv_used: int = 0          # tokens held in the KV-cache after the step, live sequences
    kv_reserved: int = 0      # token places reserved for them (rows, or allocated blocks)

    @classmethod
    def of(cls, start_s: float, end_s: float, pairs, decode_tokens: int = 0, rows=None,
           slots=None, logit_rows=None, **more) -> "Step":
        """The step in which each sequence feeds ``new`` tokens after ``cached`` ones (``pairs``:
        one ``(cached, new)`` each), ``decode_tokens`` of them generated and the rest prompt.
        ``rows`` and ``logit_rows`` default to the sequences, ``slots`` to their tokens."""
        pairs = list(pairs)
        tokens, attended, kv_read = pair_counts(pairs)
        return cls(start_s, end_s, len(pairs) if rows is None else rows,
                   tokens if slots is None else slots, tokens - decode_tokens, decode_tokens,
                   attended, kv_read, len(pairs) if logit_rows is None else logit_rows, **more)

    @property
    def useful(self) -> int:
        return self.prefill_tokens + self.decode_tokens

    @property
    def seconds(self) -> float:
        return self.end_s - self.start_s

    @property
    def kind(self) -> str:
        return "mixed" if self.prefill_tokens and self.decode_tokens else (
            "prefill" if self.prefill_tokens else "decode")


@dataclass
class RunLog:
    engine: str
    requests: list
    steps: list
    wall_s: float
    step_source: str = "engine"   # "engine": logged by our engine; "streamer": from HF generate's
                                  # token callbacks; "timestamps": rebuilt from per-token times


def percentiles(values) -> dict:
    a = np.array([v for v in values if v is not None], dtype=float)
    if not a.size:
        return dict.fromkeys(("p50", "p90", "p99", "mean"))
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(a.mean())}


def served(log: RunLog) -> tuple:
    """The requests served (not refused), and the span of the run: ``(served, first arrival,
    last finish of a served request)``."""
    done = [r for r in log.requests if r.finish_reason in ("eos", "length")]
    start = min((r.arrival_s for r in log.requests), default=0.0)
    return done, start, max((r.finish_s for r in done), default=start)


def goodput(log: RunLog, slo) -> dict:
    """Requests served within the SLO (``admission.SLO``), per second of the run, and as a share
    of all requests (refused ones count as missed)."""
    done, start, end = served(log)
    good = sum(slo.met(r) for r in done)
    return {"ttft_slo_s": slo.ttft_s, "tpot_slo_s": slo.tpot_s, "met": good,
            "goodput_rps": good / (end - start) if end > start else None,
            "attainment": good / len(log.requests) if log.requests else None}


def queue_depth(log: RunLog) -> tuple:
    """Requests waiting (arrived, not yet in any step, not refused) over time: ``(times, depth)``,
    a step function that changes at arrivals, first steps and refusals."""
    first = {rid: s.start_s for s in reversed(log.steps) for rid in s.active}   # earliest wins
    events = []
    for r in log.requests:
        leave = first.get(r.id, r.finish_s if r.finish_s is not None else r.arrival_s)
        events += [(r.arrival_s, 1), (max(leave, r.arrival_s), -1)]
    events.sort(key=lambda e: e[0])          # stable: a request arrives before it leaves
    return [0.0] + [t for t, _ in events], list(accumulate((d for _, d in events), initial=0))


def summarize(log: RunLog, shape=None, dtype_bytes: int | None = None, peaks=None,
              slo=None) -> dict:
    """The metrics block of the bench JSON (with ``slo``: goodput and the largest queue too)."""
    done, start, end = served(log)
    n_out, makespan, steps = sum(len(r.output_tokens) for r in done), end - start, log.steps
    gaps = [g for r in done for g in r.gaps_s]
    m = {"requests": len(log.requests), "served": len(done),
         "refused": sum(r.finish_reason == "refused" for r in log.requests),
         "output_tokens": n_out, "makespan_s": makespan,
         "output_tokens_per_s": n_out / makespan if makespan > 0 else None,
         "ttft_s": percentiles(r.ttft_s for r in done),
         "tpot_s": percentiles(r.tpot_s for r in done),
         "e2e_s": percentiles(r.e2e_s for r in done),
         "itl_s": {**percentiles(gaps), "max": max(gaps, default=None)},
         "steps": len(steps), "slot_utilisation": None, "mbu": None, "mfu": None}
    slots = sum(s.slots for s in steps)
    if slots and log.step_source != "timestamps":   # padding is unknown when rebuilt
        m["slot_utilisation"] = sum(s.useful for s in steps) / slots
    reserved = sum(s.kv_reserved for s in steps)
    if reserved:
        used, held = max(s.kv_used for s in steps), max(s.kv_reserved for s in steps)
        m.update(kv_tokens_used_peak=used, kv_tokens_reserved_peak=held,
                 kv_waste=1 - sum(s.kv_used for s in steps) / reserved)   # averaged over steps
        if shape is not None:
            per_token = kv_bytes_per_token(shape, dtype_bytes)
            m.update(kv_bytes_used_peak=used * per_token, kv_bytes_reserved_peak=held * per_token)
    if steps and shape is not None and peaks is not None:
        work = [(s, step_work(shape, dtype_bytes, s.useful, s.attended, s.kv_read, s.logit_rows))
                for s in steps]

        def rate(pairs, of: str, peak: float):   # time-weighted: total bytes over total time
            t = sum(s.seconds for s, _ in pairs)
            return sum(getattr(w, of) for _, w in pairs) / t / peak if t > 0 else None
        m.update(mbu=rate(work, "bytes", peaks.bandwidth), mfu=rate(work, "flops", peaks.flops),
                 step_time_s=percentiles(s.seconds for s in steps))
        # the big decode steps (128 sequences or more) against the copy bandwidth (chapter 09)
        big = [(s, w) for s, w in work if s.kind == "decode" and s.rows >= 128]
        m["decode_b128"] = {"steps": len(big), "mbu": rate(big, "bytes", peaks.bandwidth),
                            "step_time_s": percentiles(s.seconds for s, _ in big)["p50"]}
    if slo is not None:
        m.update(slo=goodput(log, slo), queue_depth_max=max(queue_depth(log)[1]))
    return m


def request_rows(log: RunLog, with_tokens: bool = False) -> list:
    """One row per request for the bench JSON (its output tokens too, ``with_tokens``)."""
    return [{"id": r.id, "arrival_s": r.arrival_s, "prompt_len": r.prompt_len,
             "n_output_tokens": len(r.output_tokens), "ttft_s": r.ttft_s, "tpot_s": r.tpot_s,
             "e2e_s": r.e2e_s, "finish_reason": r.finish_reason,
             **({"error": r.error} if r.error else {}),
             **({"output_tokens": list(r.output_tokens)} if with_tokens else {})}
            for r in log.requests]


def step_rows(log: RunLog) -> list:
    return [{k: v for k, v in asdict(s).items() if k not in ("active", "held")} for s in log.steps]


def steps_of(result: dict) -> list:
    """The ``Step`` records of a stored run (the ``steps`` rows of a bench JSON)."""
    return [Step(**row) for row in result.get("steps") or []]


HOST_TIMES = ("schedule_ms", "launch_ms", "wait_ms", "retire_ms")


def host_table(rows: list) -> str:
    """Median host times per step kind and batch range (``bench/host_overlap.py``'s summary) as a
    text table."""
    widths = (9, 8, 8, 8)
    head = " ".join(f"{k.removesuffix('_ms'):>{w}s}" for k, w in zip(HOST_TIMES, widths))
    lines = [f"{'kind':7s} {'rows':>8s} {'steps':>6s} {head}  (median ms)"]
    for r in rows:
        ms = " ".join(f"{'-' if r[k] is None else f'{r[k]:.2f}':>{w}}"
                      for k, w in zip(HOST_TIMES, widths))
        lines.append(f"{r['kind']:7s} {r['rows']:>8s} {r['steps']:6d} {ms}")
    return "\n".join(lines)


def kernel_ms(top, steps: int, *names) -> float:
    """GPU ms per step of the kernels whose name holds one of ``names``, in a profile's
    ``top`` list of ``[kernel, ms over all the steps profiled]`` (``bench/profile_decode.py``)."""
    return sum(ms for kernel, ms in top if any(x in kernel for x in names)) / steps


def prefill_rows(profiles: list) -> list:
    """One row per mixed step of stored profiles (``bench/profile_decode.py --mixed``): how the
    prompts attend, on which blocks and tiles, and GPU ms per step of FlexAttention, of the copy
    (PyTorch's gather kernel) and of the whole step."""
    rows = []
    for res in profiles:
        n = res["steps_profiled"]
        for m in res["mixed_steps"]:
            in_place = m["prefill"] == "in-place"
            tiles = res["flex_options"] if in_place else res.get("gathered_options")
            rows.append({"prefill": m["prefill"],
                         "blocks": "scattered" if m["scattered"] else "fresh",
                         "tiles": f"{tiles['BLOCK_M']} x {tiles['BLOCK_N']}" if tiles
                         else "FlexAttention's own",
                         "flex_ms": kernel_ms(m["top"], n, "flex_attention"),
                         "copy_ms": kernel_ms(m["top"], n, "index_elementwise"),
                         "step_ms": m["cuda_total_ms"] / n,
                         "commit": res["versions"]["course_lib_commit"]})
    return rows


def run_label(result: dict) -> str:
    """A short name for a run from its recorded engine and options, e.g. ``paged, flex, blocks
    of 16, 2048 blocks, B=256`` or ``fast, kernel, budget 16384, 16 GiB KV, B=512``."""
    o, engine = result.get("engine_options") or {}, result["engine"]
    words = {"attention": "{}", "block_size": "blocks of {}", "max_num_batched_tokens": "budget {}"}
    parts = [engine] + [text.format(o[k]) for k, text in words.items() if o.get(k)]
    if o.get("kv_memory_bytes"):
        parts.append(f"{o['kv_memory_bytes'] / 2**30:g} GiB KV")
    elif o.get("num_blocks"):
        parts.append(f"{o['num_blocks']} blocks")
    if engine in ("chunked", "paged", "fast"):       # switches said only where not the default
        default = engine == "fast" and result.get("device", {}).get("type") == "cuda"
        parts += [f"{k}={'on' if o[k] else 'off'}" for k in ("cuda_graphs", "fused", "overlap")
                  if k in o and bool(o[k]) != default]
    if o.get("watermark"):
        parts.append(f"{o['watermark']:.0%} kept free")
    if o.get("slo"):
        parts.append("admission")
    return ", ".join(parts + [f"B={result['max_batch']}"])
