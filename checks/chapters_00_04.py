"""The checks of chapters 00-04: the model's pieces, the roofline's arithmetic, padding, and the
static and continuous batch loops run on the real model against the library's engines."""
from __future__ import annotations

import math
import random
import time
from collections import deque

import numpy as np
import torch
from transformers import LlamaConfig

from checks.common import as_tensor, close, compare, ok, smollm
from course_lib.engines.continuous import ContinuousEngine, admit
from course_lib.engines.dynamic import fits
from course_lib.engines.runner import left_pad
from course_lib.engines.static import StaticEngine
from course_lib.measure.metrics import RequestRecord, Step
from course_lib.model import attention, models
from course_lib.model.kv_cache import kv_bytes_per_token
from course_lib.model.llama import LlamaShape, rms_norm
from course_lib.requests import Request, chat_workload

_rng = random.Random()     # the checks' own random inputs, apart from the notebook's


# ---------------------------------------------------------------- chapter 00
def check_rms_norm(fn):
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    # the last case has small values, where eps changes the result
    for shape, scale, eps in [((5, 16), 3, 1e-5), ((2, 3, 64), 3, 1e-5), ((576,), 3, 1e-5),
                              ((4, 32), 0.1, 1e-2)]:
        x = torch.randn(*shape, generator=g) * scale
        w = torch.rand(shape[-1], generator=g) + 0.5
        got = as_tensor(fn(x, w, eps), x.shape)
        assert torch.allclose(got, rms_norm(x, w, eps), rtol=1e-4, atol=1e-5), (
            "values differ: divide x by sqrt(mean(x**2 over the last dimension) + eps), "
            "then multiply by the weight")
    ok("rms_norm matches the model's normalisation")


def check_kv_cache_bytes(fn):
    for name, preset in models.PRESETS.items():
        cfg = LlamaConfig(**preset.config)
        compare(fn, lambda config, n, b: n * kv_bytes_per_token(LlamaShape.from_config(config), b),
                 [(cfg, 1, 4), (cfg, random.randint(2, 5000), 2)],
                 f"{name}, {{1}} tokens at {{2}} bytes", ". Hint: K and V, every layer, "
                 "num_key_value_heads (not num_attention_heads) x head_dim")
    ok("kv_cache_bytes is right for every preset (grouped-query attention included)")


# ---------------------------------------------------------------- chapter 01
def check_decode_intensity(fn):
    compare(fn, lambda n_params, bpp, batch: 2 * n_params * batch / (n_params * bpp),
             [(7e9, 2, 1), (7e9, 2, 8), (135e6, 4, 64), (1.2e9, 1, 3)],
             "n_params={:g}, bytes_per_param={}, batch={}",
             ". Hint: 2 FLOPs per parameter per token; the weights are read once per step", close)
    ok("decode_intensity: FLOPs per byte grow with the batch, bytes do not")


def check_crossover_batch(fn):
    compare(fn, lambda flops, bw, bpp: math.ceil(flops / bw * bpp / 2),
             [(312e12, 2.0e12, 2), (989e12, 3.35e12, 2), (200e9, 30e9, 4), (100e12, 1e12, 1)],
             "peak {:g} FLOP/s, {:g} B/s, {} bytes/param", ". Hint: the smallest whole batch "
             "whose intensity reaches the ridge (peak FLOP/s over bandwidth)")
    ok("crossover_batch: below it decode is memory-bound, above it compute-bound")


# ---------------------------------------------------------------- chapter 02
def check_left_pad(fn):
    for rows, pad in [([[5, 6, 7], [8]], 0), ([[1], [2, 3], [4, 5, 6, 7]], 2), ([[9, 9]], 0)]:
        got, (tokens, start) = fn(rows, pad), left_pad(rows, pad)
        assert got is not None and len(got) == 2, "return (tokens, start)"
        assert torch.equal(torch.as_tensor(got[0]), tokens), (
            f"tokens for {rows}, pad {pad}: got {got[0]}, expected {tokens.tolist()} (pads go on "
            "the left)")
        assert torch.equal(torch.as_tensor(got[1]), start), (
            f"start for {rows}: got {got[1]}, expected {start.tolist()}")
    ok("left_pad: every prompt ends in the last column")


def check_prefill_mask(fn):
    for start in [[0], [2, 0], [3, 1, 0]]:
        start = torch.tensor(start)
        T = int(start.max()) + 3
        want = attention.padded_visibility(start, torch.arange(T).expand(len(start), T), T)
        assert torch.equal(as_tensor(fn(start, T), want.shape).bool(), want), (
            f"start={start.tolist()}: a real token at column c sees columns start..c; a padding "
            "token sees only itself")
    ok("prefill_mask: causal, blind to padding, and no empty row")


# ---------------------------------------------------------------- chapter 03
def check_fits(fn):
    cases = [(10, 5, 10, 20), (11, 5, 10, 20), (3, 18, 10, 28), (3, 19, 10, 28)]
    cases += [tuple(_rng.randint(1, 40) for _ in range(4)) for _ in range(50)]
    compare(fn, fits, cases, "prompt_len, max_new_tokens, cursor, cache_len = {}, {}, {}, {}",
             same=lambda got, want: bool(got) == want)
    ok("fits: the newcomer's prompt ends before the cursor and its answer fits after it")


# ---------------------------------------------------------------- chapter 04
def check_admit(fn):
    for _ in range(30):
        arrivals = sorted(_rng.uniform(0, 2) for _ in range(_rng.randint(0, 6)))
        reqs = [Request(f"r{i}", [5], 1, arrival_s=t) for i, t in enumerate(arrivals)]
        free, now = _rng.sample(range(8), _rng.randint(0, 4)), _rng.uniform(0, 2)
        q1, f1, q2, f2 = deque(reqs), list(free), deque(reqs), list(free)
        want = [(r.id, s) for r, s in admit(q1, f1, now)]
        got = [(r.id, s) for r, s in (fn(q2, f2, now) or [])]
        assert got == want, (f"queue arrivals {arrivals}, free {free}, now {now:.2f}: got {got}, "
                             f"expected {want}")
        assert list(q2) == list(q1) and sorted(f2) == sorted(f1), "update the queue and free list"
    ok("admit: arrived requests, oldest first, into the lowest free slots")


def check_slot_utilisation(fn):
    for _ in range(20):
        steps = []
        for slots in [_rng.randint(1, 50) for _ in range(_rng.randint(1, 10))]:
            p = _rng.randint(0, slots)
            steps.append(Step(0, 1, rows=1, slots=slots, prefill_tokens=p, attended=0, kv_read=0,
                              decode_tokens=_rng.randint(0, slots - p), logit_rows=0))
        got, want = fn(steps), sum(s.useful for s in steps) / sum(s.slots for s in steps)
        assert close(got, want), (
            f"got {got}, expected {want}: useful token slots (prefill + decode) over all slots")
    ok("slot_utilisation: useful slots over slots computed")


def check_ttft_tpot(fn):
    for i in range(20):                           # the first answer has one token
        rec = RequestRecord("r", arrival_s=_rng.uniform(0, 1), prompt_len=5)
        gaps = [_rng.uniform(0.01, 0.5) for _ in range(1 if i == 0 else _rng.randint(1, 8))]
        for t in rec.arrival_s + np.cumsum(gaps):
            rec.emit(7, float(t))
        got = fn(rec.arrival_s, list(rec.token_times))
        assert got is not None and len(got) == 2, "return (ttft, tpot)"
        assert close(got[0], rec.ttft_s), f"TTFT: got {got[0]}, expected {rec.ttft_s}"
        assert close(got[1], rec.tpot_s), (
            f"TPOT: got {got[1]}, expected {rec.tpot_s} (time between the first and the last "
            "token, over the number of gaps; undefined, None, for a one-token answer)")
    ok("ttft_tpot: the two latencies a user feels")


# ---------------------------------------------------------------- chapters 02 and 04: the loops
_RUNS = {}     # the library engines' runs, made once per process


class _NoWait:
    """An engine clock that runs in real time but skips waits: a late arrival costs nothing."""
    _skipped, _reads = 0.0, 0

    def clock(self):
        self._reads += 1
        assert self._reads < 10**5, ("your loop spins without running anything: when nothing "
                                     "runs, wait for the next arrival (self.wait_until)")
        return time.perf_counter() + self._skipped

    def sleep(self, seconds):
        self._skipped += seconds


def _run_loop(cls, base, arrivals, max_new, max_batch):
    """Serve chat requests on SmolLM2 with the learner's engine ``cls``: the same greedy tokens as
    the library's ``base``. Returns (requests by arrival, its steps, its records by id)."""
    assert isinstance(cls, type) and issubclass(cls, base), f"define a subclass of {base.__name__}"
    assert cls.schedule is not base.schedule, "write your own schedule method in your class"
    loaded, model = smollm()
    reqs = chat_workload(loaded.tokenizer, n=len(arrivals))
    for r, t, n in zip(reqs, arrivals, max_new):
        r.arrival_s, r.max_new_tokens = t, n

    def run(c):
        return type(c.__name__, (_NoWait, c), {})(loaded, max_batch, model=model).run(reqs)
    if base not in _RUNS:
        _RUNS[base] = run(base)
    try:
        got = run(cls)
    except Exception as e:
        raise AssertionError(f"your engine raised {type(e).__name__}: {e}") from e
    for mine, want in zip(got.requests, _RUNS[base].requests):
        assert mine.output_tokens == want.output_tokens, (
            f"request {mine.id}: your engine gave the tokens {mine.output_tokens}, the library's "
            f"{want.output_tokens}. Same model, greedy decoding: they must be identical. Check the "
            "rows you pass to self.forward (slot, tokens, first_col, start) and the seqs' order")
    return sorted(reqs, key=lambda r: r.arrival_s), got.steps, {r.id: r for r in got.requests}


def check_static_schedule(cls):
    """``cls``: a ``StaticEngine`` subclass with its own ``schedule``, checked in its step log."""
    mb = 2
    order, steps, recs = _run_loop(cls, StaticEngine, [0, 0, 0, 0, 100], [12, 3, 2, 6, 4], mb)
    batches = []                                  # (request ids, its decode steps)
    for s in steps:
        if s.kind != "prefill":
            assert batches, "the first step must prefill a batch"
            batches[-1][1].append(s)
            continue
        late = [i for i in s.active if recs[i].arrival_s > s.start_s]
        assert not late, (f"a batch started at {s.start_s:.2f} s, before {late} arrived: wait "
                          "until the batch's last request is here (self.wait_until)")
        busy = [i for b, _ in batches for i in b if recs[i].finish_s > s.start_s]
        assert not busy, (f"{s.active} joined while {busy} were still running: a static batch "
                          "takes no newcomer until all of its rows are done")
        assert len(s.active) <= mb, f"a batch of {len(s.active)} requests; max_batch is {mb}"
        batches.append((s.active, []))
    for k, (ids, decodes) in enumerate(batches):
        want = [r.id for r in order[k * mb:(k + 1) * mb]]
        assert sorted(ids) == sorted(want), (f"batch {k + 1} holds {ids}; expected the next {mb} "
                                             f"requests in arrival order, {want}")
        longest = max(len(recs[i].output_tokens) for i in ids)
        assert len(decodes) == longest - 1, (
            f"batch {k + 1} ran {len(decodes)} decode steps; its longest answer has {longest} "
            f"tokens, so {longest - 1} decode steps after the prefill (which gives each its first)")
        for s in decodes:
            assert s.rows == len(ids) and sorted(s.active + s.held) == sorted(ids), (
                f"a decode step of batch {k + 1} computed {s.rows} rows ({s.active}); every decode "
                "step computes all the batch's rows: a finished request keeps its row to the end")
    ok(f"static schedule ({len(order)} requests, max_batch={mb}): the library's tokens, "
        "batches in arrival order, each run to its longest answer")


def check_continuous_schedule(cls):
    """``cls``: a ``ContinuousEngine`` subclass with its own ``schedule``, checked in its steps."""
    mb = 2
    order, steps, recs = _run_loop(cls, ContinuousEngine, [0, 0, 0, 0.2, 100], [12, 3, 2, 6, 4], mb)
    admitted, last_decode = set(), 0.0
    for s in steps:
        if s.kind == "prefill":
            early = [i for i in s.active if recs[i].arrival_s > s.start_s]
            assert not early, (f"{early} admitted at {s.start_s:.2f} s, before arriving: admit "
                               "only requests whose arrival_s has passed (self.now())")
            admitted |= set(s.active)
            continue
        running = {i for i in admitted if recs[i].finish_s is None or recs[i].finish_s > s.start_s}
        assert not s.held, (f"a decode step computed the rows of {s.held}, which had finished: "
                            "finished sequences leave before the next step")
        assert len(running) <= mb, f"{len(running)} sequences running at once; max_batch is {mb}"
        assert set(s.active) == running, (
            f"a decode step ran {sorted(s.active)} while {sorted(running)} were running: every "
            "decode step covers every running sequence")
        waiting = [r.id for r in order if r.id not in admitted and r.arrival_s <= last_decode]
        assert len(running) == mb or not waiting, (
            f"a decode step ran {len(running)} of {mb} rows while {waiting} had arrived and "
            "waited: a finished sequence's row is free at the next iteration; admit into it first")
        last_decode = s.end_s
    ok(f"continuous schedule ({len(order)} requests, max_batch={mb}): the library's tokens, "
        "every free row taken at the next iteration")
