"""The exercise checks of chapters 05-09 tell a right answer from a plausible wrong one: each
passes the course's own answer and raises ``AssertionError`` on a mistake a learner could make
(a chunk over the budget, the oldest preempted, a block never freed, an off-by-one slot...)."""
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import checks as ex
from checks import chapters_05_09
from course_lib.engines.block_manager import BlockAllocator, BlockManager
from course_lib.engines.model_runner import packed_inputs
from course_lib.engines.policies import admission_rule
from course_lib.engines.prefix_cache import block_key
from course_lib.engines.scheduler import budget_step, chunk_sizes
from course_lib.model.attention import block_diagonal_causal, bucket, cu_seqlens


def packed_mask(cu):
    n = cu[-1]
    seq = torch.bucketize(torch.arange(n), torch.tensor(cu[1:]), right=True)
    pos = torch.arange(n) - torch.tensor(cu)[seq]
    return block_diagonal_causal(seq, pos, seq, pos)


def tile_slots(table, start, block_n, block_size, end, shift=0):
    pos = torch.arange(start, start + block_n)
    blocks = table[(pos // block_size).clamp(max=len(table) - 1)]
    return blocks * block_size + pos % block_size + shift, pos < end


def combine_splits(m, l, o, rescale=True):
    w = torch.exp(m - m.max()) if rescale else torch.ones_like(m)
    w = torch.where(l > 0, w, torch.zeros_like(w))
    return (w[:, None] * o).sum(0) / (w * l).sum()


def tiles_to_read(lo, hi, T, n_kv_tiles, last=0):
    q_tiles = -(-len(lo) // T)
    out = np.zeros((q_tiles, n_kv_tiles), dtype=bool)
    for q in range(q_tiles):
        a, b = lo[q * T:(q + 1) * T].min(), hi[q * T:(q + 1) * T].max()
        out[q, a // T: b // T + 1 - last] = True
    return out


def percentile(values, q, nearest=False):
    if not values:
        return None
    v, k = sorted(values), (len(values) - 1) * q / 100
    if nearest:
        return v[round(k)]
    lo = int(k)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (k - lo)


class RightOnTheTableOnly:
    """Right on the check's table of cases (its first 202 calls), then admits everything: the
    engine part of the check must see it."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        return admission_rule(*args) if self.calls <= 202 else "admit"


class AllocatorHandingOutTwice(BlockAllocator):
    def allocate(self):
        block = super().allocate()
        self.free(block)                  # forgets that it handed the block out
        return block


class AllocatorThatNeverRunsOut:
    def __init__(self, n):
        self.next, self.n_free = 0, n

    def allocate(self):
        self.next, self.n_free = self.next + 1, max(0, self.n_free - 1)
        return self.next - 1

    def free(self, block):
        self.n_free += 1


class LeakingBlocks(BlockManager):
    def release(self, seq_id):            # forgets the allocator: its blocks are never free again
        self.tables.pop(seq_id, None)
        self.lengths.pop(seq_id, None)


class OneBlockTooMany(BlockManager):
    def grow(self, seq_id, n_new):
        super().grow(seq_id, n_new)
        if self.n_free:
            self.tables[seq_id].append(self.allocator.allocate())


class GrowEachHalfway(BlockManager):
    def grow_each(self, seq_ids):         # grows who it can, then says it could not
        ok = True
        for s in seq_ids:
            if self.can_grow(s, 1):
                self.grow(s, 1)
            else:
                ok = False
        return ok


def free_decodes(running, budget):
    """Decodes not counted against the budget."""
    plan = [(s, 1) for s in running if s.pending == 1]
    prompts = [s for s in running if s.pending > 1]
    return plan + [(s, n) for s, n in zip(prompts, chunk_sizes([s.pending for s in prompts],
                                                                  budget)) if n]


RIGHT_AND_WRONG = {
    "check_chunk_sizes": (chunk_sizes, [lambda pending, budget: [min(n, budget) for n in pending]]),
    "check_steps_to_prefill": (lambda p, b, d: math.ceil(p / (b - d)),
                               [lambda p, b, d: math.ceil(p / b), lambda p, b, d: p // (b - d)]),
    "check_cu_seqlens": (cu_seqlens, [lambda lengths: list(itertools.accumulate(lengths))]),
    "check_packed_mask": (packed_mask, [lambda cu: torch.ones(cu[-1], cu[-1]).tril().bool()]),
    "check_block_slot": (lambda t, p, bs: t[p // bs] * bs + p % bs,
                         [lambda t, p, bs: t[p // bs] + p % bs,
                          lambda t, p, bs: t[p // bs] * bs + p % bs + 1]),
    "check_allocator": (BlockAllocator, [AllocatorHandingOutTwice, AllocatorThatNeverRunsOut]),
    "check_percentile_latency": (percentile, [lambda v, q: percentile(v, q, nearest=True)]),
    "check_admission_rule": (admission_rule, [
        lambda w, f, d, ttft, tpot: "queue" if d > tpot else admission_rule(w, f, d, ttft, tpot),
        lambda w, f, d, ttft, tpot: admission_rule(0.0, f, d, ttft, tpot),
        # refuses a first token due exactly at the TTFT target; queues at exactly the TPOT target
        lambda w, f, d, ttft, tpot: "refuse" if w + f >= ttft else admission_rule(w, f, d, ttft,
                                                                                  tpot),
        lambda w, f, d, ttft, tpot: "queue" if w + f <= ttft and d >= tpot else admission_rule(
            w, f, d, ttft, tpot),
        RightOnTheTableOnly()]),
    "check_tile_slots": (tile_slots, [
        lambda *a: tile_slots(*a, shift=1),
        lambda t, s, n, bs, end: (tile_slots(t, s, n, bs, end)[0], torch.arange(s, s + n) <= end)]),
    "check_combine_splits": (combine_splits, [lambda m, l, o: combine_splits(m, l, o, False)]),
    "check_packed_inputs": (packed_inputs, [
        lambda rows, last: torch.tensor([t if t is not None else int(last[i]) for i, (new, _) in
                                         enumerate(rows) for t in new])]),
    "check_tiles_to_read": (tiles_to_read, [lambda *a: tiles_to_read(*a, last=1)]),
    "check_token_budget_step": (budget_step, [
        lambda running, budget: [(s, s.pending) for s in running],        # chunks over the budget
        lambda running, budget: budget_step(running, budget)[::-1],       # the decodes last
        free_decodes]),
    "check_block_manager": (BlockManager, [LeakingBlocks, OneBlockTooMany, GrowEachHalfway]),
    "check_block_key": (block_key, [
        lambda prev, tokens: hash(tuple(tokens)),                          # not chained
        lambda prev, tokens: hash((prev, tokens[0])),                      # the first token only
        # chained only where the check's first question looks: the engine's answers change
        lambda prev, tokens: hash((prev, tuple(tokens)) if tuple(tokens) == (1, 2, 3, 4)
                                  else tuple(tokens))]),
    "check_head_rows": (lambda n: bucket(n, 16), [
        lambda n: n,                                                      # no buckets
        lambda n: max(16, n),
        lambda n: 1 << (n - 1).bit_length(),                              # 1, 2, 4, 8 too
        lambda n: max(16, 2 ** n.bit_length()),                           # 32 for 16
        lambda n: max(16, 1 << (n.bit_length() - 1))]),                   # rounds down
    "check_victim": (lambda running: running[-1], [
        lambda running: running[0],                                       # the oldest
        lambda running: running[-2] if len(running) > 1 else running[0]]),  # one off
}


BOUNDARY = {   # mistakes that a check's random cases show on some draws only
    "check_steps_to_prefill": ("ceil as floor + 1 (wrong when the steps divide the prompt)",
                               lambda p, b, d: p // (b - d) + 1),
    "check_tile_slots": ("valid up to end inclusive", lambda t, s, n, bs, end: (
        tile_slots(t, s, n, bs, end)[0], torch.arange(s, s + n) <= end)),
}


@pytest.mark.parametrize("name", BOUNDARY)
def test_the_check_raises_on_a_boundary_mistake_on_every_draw(name, monkeypatch, capsys):
    from test_checks_ch00_04 import accepted_on_draws
    why, wrong = BOUNDARY[name]
    accepted = accepted_on_draws(getattr(ex, name), wrong, 300, monkeypatch)
    assert not accepted, (f"{name} accepts a wrong answer ({why}) on {len(accepted)} of 300 "
                          f"draws (seeds {accepted[:5]}...)")


@pytest.mark.parametrize("name", RIGHT_AND_WRONG)
def test_the_check_passes_the_right_answer_and_raises_on_wrong_ones(name):
    check, (right, wrong) = getattr(ex, name), RIGHT_AND_WRONG[name]
    check(right)
    for answer in wrong:
        with pytest.raises(AssertionError):
            check(answer)


def test_every_check_of_chapters_05_to_09_is_tried():
    checks = {n for n in vars(chapters_05_09) if n.startswith("check_")}
    assert checks == set(RIGHT_AND_WRONG)


def test_every_check_has_its_exercise():
    """A check that no notebook calls grades nothing: every ``check_*`` of the library is called
    by some notebook."""
    notebooks = Path(__file__).resolve().parent.parent / "notebooks"
    sources = "".join(p.read_text() for p in notebooks.glob("*.ipynb"))
    orphans = [n for n, f in vars(ex).items() if n.startswith("check_") and callable(f)
               and f"{n}(" not in sources]
    assert not orphans, orphans
