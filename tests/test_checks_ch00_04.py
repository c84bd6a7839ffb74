"""The checks of notebooks 00-04 accept the right answer and reject plausible wrong ones: an
off-by-one, a forgotten factor, padding on the wrong side, admitting before arrival, a static loop
that refills mid-batch, a continuous loop that keeps finished rows, ..."""
import math
import random
import sys
from collections import deque

import pytest
import torch

import checks as ex
from checks import chapters_00_04
from course_lib.engines.continuous import ContinuousEngine, admit
from course_lib.engines.dynamic import fits
from course_lib.engines.padded import Seq
from course_lib.engines.runner import Row, left_pad
from course_lib.engines.static import StaticEngine
from course_lib.model.attention import padded_visibility
from course_lib.model.llama import rms_norm


def _kv_bytes(factor=2, heads="num_key_value_heads"):
    def fn(cfg, n, b):
        hd = cfg.hidden_size // cfg.num_attention_heads
        return n * cfg.num_hidden_layers * factor * getattr(cfg, heads) * hd * b
    return fn


def _mask(start, T, pad_sees_itself=True):
    q, k = torch.arange(T)[None, :, None], torch.arange(T)[None, None, :]
    real = (k >= start[:, None, None]) & (k <= q)
    return real | (k == q) if pad_sees_itself else real


def _admit(queue, free, now, check_arrival=True, lowest=True):
    out = []
    while queue and free and (queue[0].arrival_s <= now or not check_arrival):
        free.sort(reverse=not lowest)
        out.append((queue.popleft(), free.pop(0)))
    return out


def _tpot(arrival, times, gaps=lambda n: n - 1):
    return times[0] - arrival, (times[-1] - times[0]) / gaps(len(times)) if len(times) > 1 else None


SIMPLE = {   # check: (right answer, {wrong answer: what is wrong with it})
    "check_rms_norm": (rms_norm, {
        "mean over the whole tensor": lambda x, w, eps: w * x * torch.rsqrt(x.pow(2).mean() + eps),
        "no weight": lambda x, w, eps: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps),
        "sum, not mean": lambda x, w, eps: w * x * torch.rsqrt(x.pow(2).sum(-1, True) + eps),
        "eps ignored": lambda x, w, eps: w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))}),
    "check_kv_cache_bytes": (_kv_bytes(), {
        "query heads instead of KV heads": _kv_bytes(heads="num_attention_heads"),
        "K only, not V": _kv_bytes(factor=1)}),
    "check_decode_intensity": (lambda p, b, n: 2 * n / b, {
        "one FLOP per parameter": lambda p, b, n: n / b,
        "weights read once per sequence": lambda p, b, n: 2 / b}),
    "check_crossover_batch": (lambda f, bw, b: math.ceil(f / bw * b / 2), {
        "rounded down": lambda f, bw, b: int(f / bw * b / 2),
        "bytes per parameter forgotten": lambda f, bw, b: math.ceil(f / bw / 2)}),
    "check_left_pad": (left_pad, {
        "padded on the right": lambda rows, pad: (
            torch.tensor([list(r) + [pad] * (max(map(len, rows)) - len(r)) for r in rows]),
            torch.zeros(len(rows), dtype=torch.long)),
        "start off by one": lambda rows, pad: (left_pad(rows, pad)[0], left_pad(rows, pad)[1] + 1),
        "pads with 0, whatever pad is asked": lambda rows, pad: left_pad(rows, 0),
    }),
    "check_prefill_mask": (
        lambda start, T: padded_visibility(start, torch.arange(T).expand(len(start), T), T), {
            "padding query sees nothing (empty softmax row)": lambda s, T: _mask(s, T, False),
            "padding visible": lambda s, T: _mask(torch.zeros_like(s), T)}),
    "check_fits": (fits, {
        "prompt shorter than the cursor (off by one)": lambda p, n, c, L: p < c and c + n <= L,
        "answer may reach past the cache": lambda p, n, c, L: p <= c and c + n <= L + 1}),
    "check_admit": (admit, {
        "admits before arrival": lambda q, f, now: _admit(q, f, now, check_arrival=False),
        "highest free slot first": lambda q, f, now: _admit(q, f, now, lowest=False),
        "leaves the queue as it is": lambda q, f, now: admit(deque(q), f, now)}),
    "check_slot_utilisation": (lambda st: sum(s.useful for s in st) / sum(s.slots for s in st), {
        "decode tokens only": (
            lambda st: sum(s.decode_tokens for s in st) / sum(s.slots for s in st)),
        "mean of the per-step shares": lambda st: sum(s.useful / s.slots for s in st) / len(st)}),
    "check_ttft_tpot": (_tpot, {
        "divides by the tokens, not the gaps": lambda a, t: _tpot(a, t, gaps=lambda n: n),
        "TTFT from the first token, not arrival": lambda a, t: (t[0], _tpot(a, t)[1])}),
}


def accepts_right_rejects_wrong(check, cases, capsys):
    right, wrongs = cases[check]
    getattr(ex, check)(right)
    assert capsys.readouterr().out.startswith("✓")
    for why, wrong in wrongs.items():
        with pytest.raises(AssertionError):
            getattr(ex, check)(wrong)
            pytest.fail(f"{check} accepts a wrong answer: {why}")


@pytest.mark.parametrize("check", SIMPLE)
def test_check_accepts_the_right_answer_and_rejects_wrong_ones(check, capsys):
    accepts_right_rejects_wrong(check, SIMPLE, capsys)


def accepted_on_draws(check, wrong, draws, monkeypatch):
    """The seeds of the check module's ``_rng`` (its random cases), of ``range(draws)``, on which
    ``check`` accepts ``wrong``. A mistake caught on some draws only passes some learners: the
    case that shows it must be in every draw."""
    accepted = []
    for seed in range(draws):
        monkeypatch.setattr(sys.modules[check.__module__], "_rng", random.Random(seed))
        try:
            check(wrong)
        except AssertionError:
            continue
        accepted.append(seed)
    return accepted


def _tpot_zero(arrival, times):
    return times[0] - arrival, (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0


def test_ttft_tpot_check_rejects_a_one_token_tpot_of_0_on_every_draw(monkeypatch, capsys):
    accepted = accepted_on_draws(ex.check_ttft_tpot, _tpot_zero, 100, monkeypatch)
    assert not accepted, (f"check_ttft_tpot accepts TPOT 0.0 (not None) for a one-token answer "
                          f"on {len(accepted)} of 100 draws (seeds {accepted[:5]}...)")


def test_every_check_of_chapters_00_to_04_is_tried():
    checks = {n for n in vars(chapters_00_04) if n.startswith("check_")}
    assert checks == set(SIMPLE) | set(LOOPS)


# ------------------------------------------------- the batch loops, on the real model (slower)

def _static(self, requests, keep_rows=True, wait=True, by_length=False, ignore_eos=False):
    queue = deque(sorted(requests, key=lambda r: len(r.prompt_tokens)) if by_length else requests)
    while queue:
        batch = [queue.popleft() for _ in range(min(self.max_batch, len(queue)))]
        if wait:
            self.wait_until(max(r.arrival_s for r in batch))
        width = max(len(r.prompt_tokens) for r in batch)
        seqs = [Seq(r, i, width - len(r.prompt_tokens)) for i, r in enumerate(batch)]
        self.forward(seqs, [Row(s.slot, s.req.prompt_tokens, s.start, s.start) for s in seqs],
                     prefill=True)
        for _ in range(max(r.max_new_tokens for r in batch) - 1 if ignore_eos else 10**6):
            if not ignore_eos and all(s.done for s in seqs):
                break
            rows = [s for s in seqs if keep_rows or not s.done]
            self.forward(rows, [Row(s.slot, [s.last], s.next_col, s.start) for s in rows])


def _continuous(self, requests, arrived=True, retire=True, keep_done=False, idle_wait=True):
    queue, running, free = deque(requests), [], list(range(self.max_batch))
    while queue or running:
        new = [Seq(r, slot, 0) for r, slot in _admit(queue, free, self.now(), arrived)]
        if new:
            self.forward(new, [Row(s.slot, s.req.prompt_tokens, 0, 0) for s in new],
                         pad_left=False, prefill=True)
            running += new
        live = sorted((s for s in running if keep_done or not s.done), key=lambda s: s.slot)
        if any(not s.done for s in live):
            self.forward(live, [Row(s.slot, [s.last], s.next_col, 0) for s in live])
        if retire or all(s.done for s in running):
            free += [s.slot for s in running if s.done]
            running = [s for s in running if not s.done]
        if not running and queue and idle_wait:
            self.wait_until(queue[0].arrival_s)


def _engine(base, loop, **wrong):
    return type("Mine", (base,), {"schedule": lambda self, reqs: loop(self, reqs, **wrong)})


LOOPS = {
    "check_static_schedule": (_engine(StaticEngine, _static), {
        "refills mid-batch": type("Mine", (StaticEngine,), {"schedule": ContinuousEngine.schedule}),
        "drops finished rows": _engine(StaticEngine, _static, keep_rows=False),
        "starts a batch before it has arrived": _engine(StaticEngine, _static, wait=False),
        "batches by prompt length": _engine(StaticEngine, _static, by_length=True),
        "ignores EOS: max_new_tokens steps": _engine(StaticEngine, _static, ignore_eos=True),
        "calls the library's schedule": StaticEngine}),
    "check_continuous_schedule": (_engine(ContinuousEngine, _continuous), {
        "admits before arrival": _engine(ContinuousEngine, _continuous, arrived=False),
        "frees rows only when all are done": _engine(ContinuousEngine, _continuous, retire=False),
        "decodes finished rows": _engine(ContinuousEngine, _continuous, retire=False,
                                         keep_done=True),
        "spins until the next arrival": _engine(ContinuousEngine, _continuous, idle_wait=False),
        "a static loop": type("Mine", (ContinuousEngine,), {"schedule": StaticEngine.schedule})}),
}


@pytest.mark.parametrize("check", LOOPS)
def test_loop_check_accepts_the_right_loop_and_rejects_wrong_ones(check, capsys):
    accepts_right_rejects_wrong(check, LOOPS, capsys)
