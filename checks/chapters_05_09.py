"""The checks of chapters 05-09: the token budget, packing, the block manager, preemption and
prefix caching, admission, and the CUDA engine's pieces; most plug the learner's code into the
paged engine and compare its answers with Hugging Face's."""
from __future__ import annotations

import contextlib
import functools
import math
import random
from types import SimpleNamespace
from unittest import mock

import numpy as np
import torch

from checks.common import as_tensor, close, compare, ok, smollm
from course_lib.engines import make_engine
from course_lib.engines.block_manager import BlockManager, OutOfBlocks
from course_lib.engines.model_runner import packed_inputs
from course_lib.engines.policies import SLO, AdmissionController
from course_lib.engines.prefix_cache import PrefixCachingBlockManager
from course_lib.engines.scheduler import Scheduler, budget_step, chunk_sizes
from course_lib.measure.costmodel import FEATURES, StepCost
from course_lib.measure.simulator import simulate
from course_lib.model import attention, models
from course_lib.model.kv_cache import PagedKVCache
from course_lib.model.llama import LlamaShape
from course_lib.requests import Request, chat_workload, poisson_arrivals

_rng = random.Random()     # the checks' own random inputs, apart from the notebook's


# ---------------------------------------------------------------- chapter 05
def check_chunk_sizes(fn):
    cases = [([100, 30], 64), ([10, 20, 30], 64), ([5], 64), ([], 8), ([64, 1], 64)]
    cases += [([_rng.randint(1, 300) for _ in range(_rng.randint(0, 5))], _rng.randint(1, 256))
              for _ in range(40)]
    compare(fn, chunk_sizes, cases, "pending {}, budget {}", " (in order, each takes what it "
             "needs or what is left)", lambda got, want: list(got or []) == want)
    ok("chunk_sizes: the token budget, filled in order")


def check_steps_to_prefill(fn):
    budgets = [_rng.randint(2, 512) for _ in range(50)]
    cases = [(120, 64, 4), (64, 64, 0), (300, 100, 0)]      # steps that divide the prompt
    cases += [(_rng.randint(1, 2000), b, _rng.randint(0, b - 1)) for b in budgets]
    compare(fn, lambda p, b, d: math.ceil(p / (b - d)), cases, "prompt {}, budget {}, {} decoding",
             ". Hint: the decodes go first, the prompt gets what is left of each step")
    ok("steps_to_prefill: a bigger budget, fewer but longer steps")


@functools.cache
def _hf_answer(prompt: tuple, new: int) -> list:
    """Hugging Face's greedy answer of SmolLM2 to ``prompt``, ``new`` tokens at most."""
    out = smollm()[0].model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False)
    return out[0, len(prompt):].tolist()


def _serve_with(what, scheduler=None, blocks=None, reqs=None, max_batch=4, hint="", setup=None,
                **options):
    """The paged engine on SmolLM2 with a learner's class (or, by ``setup(engine)``, function) in
    it must answer as Hugging Face."""
    loaded = smollm()[0]
    reqs = reqs or chat_workload(loaded.tokenizer, n=4, max_new_tokens=8)
    eng = make_engine("paged", loaded, max_batch=max_batch, block_size=4, **options)
    eng.scheduler_class = scheduler or eng.scheduler_class
    eng.block_manager_class = blocks or eng.block_manager_class
    if setup:
        setup(eng)
    log = eng.run(reqs)
    for r, rec in zip(reqs, log.requests):
        want = _hf_answer(tuple(r.prompt_tokens), r.max_new_tokens)
        assert rec.output_tokens == want, (f"with your {what} in the engine, {r.id} answers "
                                           f"{rec.output_tokens}, Hugging Face {want}{hint}")
    return eng, log


def check_token_budget_step(fn):
    """``fn(running, budget)`` -> ``[(seq, tokens)]``, checked in the paged engine's scheduler."""
    chunked = []                                # a prompt cut short by the budget, in some step

    def checked(running, budget):
        pending, plan = [s.pending for s in running], fn(list(running), budget)
        assert plan is not None, "your function returns nothing"
        plan = [(s, int(n)) for s, n in plan]
        index = {id(s): i for i, s in enumerate(running)}
        where = (f"tokens to feed {pending} (in arrival order), budget {budget}: you plan "
                 f"{[(index.get(id(s), '?'), n) for s, n in plan]} (sequence index, tokens)")
        assert len({id(s) for s, _ in plan} & index.keys()) == len(plan), (
            f"{where}: plan running sequences, each at most once")
        assert all(1 <= n <= s.pending for s, n in plan), (
            f"{where}: each gets at least 1 token (leave out the others) and at most its pending")
        assert sum(n for _, n in plan) <= budget, f"{where}: that is over the budget"
        kinds = [s.pending == 1 for s, _ in plan]
        assert kinds == sorted(kinds, reverse=True), f"{where}: the decodes go first"
        want = [(index[id(s)], n) for s, n in budget_step(running, budget)]
        assert [(index[id(s)], n) for s, n in plan] == want, (
            f"{where}, expected {want}: every decode (oldest first, while the budget lasts), then "
            "each prompt in arrival order takes what it still needs or what is left")
        chunked.extend(n < s.pending for s, n in plan)
        return plan

    class Mine(Scheduler):
        budget_step = staticmethod(checked)
    _serve_with("token-budget step", Mine, max_num_batched_tokens=16)
    assert any(chunked), "the check is broken: no prompt was chunked"
    ok("token-budget step: decodes first, then prompt chunks, in the real engine")


# ---------------------------------------------------------------- chapter 06
def check_cu_seqlens(fn):
    cases = [([3, 5, 2],), ([7],), ([],)]
    cases += [([_rng.randint(1, 50) for _ in range(_rng.randint(1, 8))],) for _ in range(20)]
    compare(fn, attention.cu_seqlens, cases, "lengths {}",
             same=lambda got, want: list(got) == want)
    ok("cu_seqlens: where each sequence starts in the packed batch")


def check_packed_mask(fn):
    randoms = [[_rng.randint(1, 6) for _ in range(_rng.randint(1, 4))] for _ in range(10)]
    for lengths in [[3, 2], [1, 1, 1], [4]] + randoms:
        seq = torch.tensor([i for i, n in enumerate(lengths) for _ in range(n)])
        pos = torch.tensor([p for n in lengths for p in range(n)])
        want = attention.block_diagonal_causal(seq, pos, seq, pos)
        assert torch.equal(as_tensor(fn(attention.cu_seqlens(lengths)), want.shape).bool(), want), (
            f"lengths {lengths}: token i sees token j when they belong to the same sequence and j "
            "is not after i")
    ok("packed_mask: block-diagonal and causal")


# ---------------------------------------------------------------- chapter 07
def check_block_slot(fn):
    cases = []
    for bs in [_rng.randint(1, 32) for _ in range(50)]:
        table = _rng.sample(range(100), _rng.randint(1, 10))
        cases.append((table, _rng.randrange(len(table) * bs), bs))
    compare(fn, lambda table, p, bs: table[p // bs] * bs + p % bs, cases,
             "block table {}, position {}, block size {}",
             ". Hint: which block (p // block_size), where in it")
    ok("block_slot: position -> block -> row of the cache")


def check_allocator(cls):
    for _ in range(20):
        n = _rng.randint(1, 8)
        mine, held = cls(n), []
        for _ in range(40):
            if held and _rng.random() < 0.4:
                mine.free(held.pop(_rng.randrange(len(held))))
            elif len(held) < n:
                got = mine.allocate()
                assert got not in held, f"block {got} was handed out twice"
                assert 0 <= got < n, f"block {got} does not exist ({n} blocks)"
                held.append(got)
            else:
                try:
                    mine.allocate()
                except Exception:
                    continue
                raise AssertionError(f"all {n} blocks are in use: allocate() must raise")
            assert mine.n_free == n - len(held), (
                f"n_free is {mine.n_free}, expected {n - len(held)}")
    ok("allocator: no block twice, every freed block reusable")


def check_block_manager(cls):
    """``cls(n_blocks, block_size)``: a ``BlockManager``, on a small case, then with preemptions."""

    def sound(m, what, result=None):
        held = [b for t in m.tables.values() for b in t]
        assert len(held) == len(set(held)), f"after {what}: a block is in two tables {m.tables}"
        assert m.n_free + len(held) == m.n_blocks, (
            f"after {what}: {m.n_free} free + {len(held)} in tables, of {m.n_blocks} blocks")
        for sid, table in m.tables.items():
            assert len(table) == -(-m.lengths[sid] // m.block_size), (
                f"after {what}: {sid!r} holds {m.lengths[sid]} tokens in {len(table)} blocks "
                f"of {m.block_size}: it needs ceil(tokens / block_size)")
        return result

    class Watched(cls):
        def grow(self, *args):
            sound(self, f"grow{args}", super().grow(*args))

        def grow_each(self, seq_ids):
            return sound(self, f"grow_each({seq_ids})", super().grow_each(seq_ids))

        def release(self, seq_id):
            sound(self, f"release({seq_id!r})", super().release(seq_id))
    m = Watched(4, 2)                           # 4 blocks of 2 tokens
    m.grow("a", 3)
    m.grow("b", 1)
    with contextlib.suppress(OutOfBlocks):
        m.grow("b", 4)
        raise AssertionError("grow('b', 4) needs 2 more blocks, 1 is free: raise OutOfBlocks")
    assert m.lengths == {"a": 3, "b": 1}, "a grow that raised must change nothing"
    sound(m, "a grow that raised")
    assert m.grow_each(["a", "b"]) and not m.grow_each(["a", "b"]) and m.n_free == 1, (
        "grow_each: one token each, or False when the blocks do not suffice")
    m.release("a")
    m.release("b")
    assert m.n_free == 4 and not m.lengths, "release: every block back, the sequence forgotten"
    eng, _ = _serve_with("block manager", blocks=Watched, num_blocks=20)
    blocks = eng.cache.blocks
    assert isinstance(blocks, cls) and eng.preemptions, "the check is broken: no preemption"
    assert blocks.n_free == blocks.n_blocks and not blocks.tables, (
        f"after the run {blocks.n_free} of {blocks.n_blocks} blocks are free: release them all")
    ok(f"block manager: {eng.preemptions} preemptions, every block back, the same answers")


def check_victim(fn):
    """``fn(running)`` -> the sequence to preempt, checked in the paged engine on SmolLM2."""

    class Mine(Scheduler):
        def victim(self):
            got = fn(list(self.running))
            assert any(got is s for s in self.running), "return one of the running sequences"
            assert got is self.running[-1], (
                f"running {[s.req.id for s in self.running]} (as admitted): you preempt "
                f"{got.req.id}. Preempt the newest, "
                "the last admitted: it has the least done, and the others were there first")
            return got
    eng, _ = _serve_with("victim", Mine, num_blocks=20)
    assert eng.preemptions, "the check is broken: no preemption"
    ok(f"victim: {eng.preemptions} preemptions of the newest, the same answers")


def check_block_key(fn):
    """``fn(prev, tokens)`` -> a full block's name, checked in the paged engine's prefix cache."""
    a, b, x = [5, 6, 7, 8], [9, 10, 11, 12], [1, 2, 3, 4]
    assert fn(None, a) == fn(None, list(a)), "the same tokens must get the same name"
    assert fn(None, a) != fn(None, b) and fn(None, a) != fn(None, a[:-1] + [99]), (
        "different tokens must get different names (all of them count)")
    assert fn(fn(None, a), x) != fn(fn(None, b), x), (
        "the same block after different prefixes got the same name: their keys and values "
        "differ (attention saw different tokens before). Chain prev into the name")

    class Mine(PrefixCachingBlockManager):
        block_key = staticmethod(fn)

    def words(text):
        return smollm()[0].tokenizer(text, add_special_tokens=False)["input_ids"][:8]
    first = words("The library opens at nine on weekdays and at ten on Saturdays")
    second = words("Our museum closes early on Sundays and on every public holiday")
    shared = words("and the reading room stays quiet for those who study there all day")
    ask = words("What time is it now, please?")
    prompts = [first + shared + ask, second + shared + ask, second + shared + words("Who are you")]
    assert {len(first), len(second), len(shared)} == {8}, "the check is broken: 8-token parts"
    reqs = [Request(f"p{i}", p, max_new_tokens=6) for i, p in enumerate(prompts)]
    eng, _ = _serve_with("names in the prefix cache", blocks=Mine, reqs=reqs, max_batch=1,
                         hint=": a block was shared that holds other keys and values")
    assert eng.prefix_hit_tokens >= len(second + shared), (
        f"the last prompt repeats the second's first {len(second + shared)} tokens, and found "
        f"{eng.prefix_hit_tokens} in the cache")
    ok(f"block_key: {eng.prefix_hit_tokens} prompt tokens from the cache, the same answers")


# ---------------------------------------------------------------- chapter 08
def check_percentile_latency(fn):
    """``fn(values, q)``: the q-th percentile (0-100) as numpy's default; None for no values."""
    assert fn([], 50) is None, "no values: return None"
    cases = [([_rng.expovariate(5.0) for _ in range(_rng.randint(1, 40))],
              _rng.choice([50, 90, 99, _rng.uniform(0, 100)])) for _ in range(30)]
    compare(fn, lambda values, q: float(np.percentile(values, q)), cases, "p{1:.3g} of {0}",
             ". Sort them; the percentile sits at rank (n - 1) * q / 100, between two values when "
             "it is not whole", close)
    ok("percentile: p50, p90, p99 from raw latencies")


def check_admission_rule(fn):
    """``fn(waited_s, first_token_s, decode_step_s, ttft_slo, tpot_slo)`` -> "admit", "queue" or
    "refuse". Checked on cases, then as the paged engine's rule on an overload (simulated)."""
    seen = set()
    cases = [(0.25, 0.25, 0.01, 0.5, 0.05), (0.1, 0.2, 0.05, 1.0, 0.05)]   # on a target: admit
    cases += [(_rng.uniform(0, 1), _rng.uniform(0.01, 0.5), _rng.uniform(0.005, 0.1),
               _rng.uniform(0.1, 1.0), _rng.uniform(0.01, 0.08)) for _ in range(200)]
    for waited, first, step, ttft, tpot in cases:
        # step times: ``first`` for a prefill step (more tokens than rows), ``step`` for a decode
        times = SimpleNamespace(predict=lambda rows, tokens, *_: first if tokens > rows else step)
        controller = AdmissionController(SLO(ttft, tpot), times)
        want, got = controller.decide(8, waited, [20])[0], fn(waited, first, step, ttft, tpot)
        seen.add(want)
        assert got == want, (
            f"waited {waited:.3g} s, first token in {first:.3g} s more, decode step {step:.3g} s, "
            f"targets TTFT {ttft:.3g} s / TPOT {tpot:.3g} s: expected {want!r}, got {got!r}")
    assert seen == {"admit", "queue", "refuse"}
    # the engine: a step takes 10 ms + 2 ms per sequence, and the controller knows it
    cost = StepCost(dict(dict.fromkeys(FEATURES, 0.0), overhead=0.01, per_row=0.002), "check",
                    math.inf, math.inf)
    reqs = poisson_arrivals([Request(f"r{i}", [3] * 20, max_new_tokens=10 + i * 7 % 20)
                             for i in range(60)], 200.0, seed=0)
    slo, logs = SLO(ttft_s=0.3, tpot_s=0.03), {}
    for name, rule in (("yours", fn), ("course", AdmissionController.rule)):
        with mock.patch.object(AdmissionController, "rule", staticmethod(rule)):
            logs[name] = simulate("paged", reqs, cost, models.preset_shape("smollm2-135m"), 2, 32,
                                  slo=slo, step_cost=cost)[1]
    served = [r for r in logs["yours"].requests if r.finish_reason == "length"]
    assert all(r.ttft_s <= slo.ttft_s + 1e-9 for r in served), (
        "a request you admitted got its first token after the TTFT target")
    assert all(r.tpot_s <= slo.tpot_s + 1e-9 for r in served), "decode steps over the TPOT target"
    fates = {k: [r.finish_reason for r in log.requests] for k, log in logs.items()}
    assert fates["yours"] == fates["course"], (
        f"you serve {fates['yours'].count('length')} of {len(reqs)} requests, the course's rule "
        f"{fates['course'].count('length')}, all on time: refuse only what would be late")
    ok(f"admission rule, in the engine: {len(served)} of {len(reqs)} served on time, the rest "
        "refused at once")


# ---------------------------------------------------------------- chapter 09
def check_tile_slots(fn):
    """``fn(table, start, block_n, block_size, end)`` -> ``(slots, valid)``: the cache slots of
    tokens ``start .. start + block_n - 1`` of a sequence, and which of them are ``< end``."""
    shape = LlamaShape(10, 4, 8, 1, 2, 1, 2, 1e4, 1e-5, 0, 4096)
    for block_size in (1, 7, 16):
        cache = PagedKVCache(shape, BlockManager(400, block_size))
        for _ in range(60):                          # three sequences growing side by side
            for sid in range(3):
                cache.grow(sid, _rng.randint(1, 3))
        for sid in range(3):
            n = cache.lengths[sid]
            table = torch.tensor(cache.tables[sid])
            # the last start's tile runs past the end of the sequence
            for start in (0, _rng.randrange(n), (n // 2) // 8 * 8, max(0, n - 3)):
                block_n = _rng.choice((8, 16, 64))
                got = fn(table, start, block_n, block_size, n)
                assert got is not None and len(got) == 2, "return (slots, valid)"
                slots, valid = (as_tensor(t, (block_n,)) for t in got)
                want_valid = torch.arange(start, start + block_n) < n
                assert torch.equal(valid.bool(), want_valid), "valid: the tokens before `end`"
                want = torch.tensor(cache.slots(sid, start, min(n, start + block_n)))
                assert torch.equal(slots[want_valid].long(), want.long()), (
                    f"block size {block_size}, tokens {start}..: slot = table[t // block_size] * "
                    f"block_size + t % block_size (masked-off entries may hold anything)")
    ok("tile slots: the kernel's address arithmetic, with the tail masked")


def check_combine_splits(fn):
    """``fn(m, l, o)`` -> attention output from each split's max score ``m`` (S,), sum of
    ``exp(score - m)`` ``l`` (S,) and unnormalised output ``o`` (S, d)."""
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    for S, n, d in ((1, 5, 4), (3, 40, 8), (6, 13, 16)):
        scores = torch.randn(n, generator=g, dtype=torch.float64) * 4
        v = torch.randn(n, d, generator=g, dtype=torch.float64)
        want = scores.softmax(0) @ v
        cuts = sorted(random.sample(range(1, n), S - 1)) if S > 1 else []
        parts = list(zip([0, *cuts], [*cuts, n]))
        m = torch.stack([scores[a:b].max() for a, b in parts])
        l = torch.stack([(scores[a:b] - m[i]).exp().sum() for i, (a, b) in enumerate(parts)])
        o = torch.stack([(scores[a:b] - m[i]).exp() @ v[a:b] for i, (a, b) in enumerate(parts)])
        if S > 2:                                   # an empty split, as the kernel writes one
            m[-1], l[-1], o[-1] = float("-inf"), 0.0, 0.0
            want = scores[:parts[-1][0]].softmax(0) @ v[:parts[-1][0]]
        got = as_tensor(fn(m, l, o), (d,), torch.float64)
        assert not got.isnan().any(), "NaN: an empty split (m = -inf, l = 0) must weigh 0"
        assert torch.allclose(got, want, atol=1e-9), (
            "rescale each split by exp(m[s] - max(m)), then sum o and l over splits and divide")
    ok("split combine: the same softmax, in pieces")


def check_packed_inputs(fn):
    """``fn(rows, last)`` -> a packed step's input tokens: per sequence ``(new tokens, src)``,
    the last new token ``None`` when it is still on the device, at ``last[src]``."""
    for seed in range(5):
        rng = random.Random(seed)
        last = torch.tensor([rng.randrange(100, 200) for _ in range(8)])
        rows = []
        for _ in range(rng.randrange(1, 6)):
            new = [rng.randrange(3, 99) for _ in range(rng.choice((1, 1, 3, 6)))]
            src = rng.randrange(8)
            if len(new) == 1 and rng.random() < 0.6:
                new[-1] = None                      # a decode whose token is in flight
            rows.append((new, src))
        if seed == 0:
            rows = [([None], 5), ([None], 2), ([7, 8, 9], 0)]
        before = [list(new) for new, _ in rows]
        got, want = fn(rows, last), packed_inputs(rows, last)
        assert [list(new) for new, _ in rows] == before, "leave the rows as they are"
        if seed == 0:       # written out, so that the check does not rest on the engine alone
            assert want.tolist() == [last[5].item(), last[2].item(), 7, 8, 9]
        assert torch.equal(as_tensor(got, want.shape).long(), want), (
            f"rows {rows}: one per new token, the known tokens in order, and last[src] where a "
            "token is None")
    ok("packed inputs: the tokens still on the device taken from where they are")


def check_tiles_to_read(fn):
    """``fn(lo, hi, T, n_kv_tiles)`` -> a boolean ``(query tiles, key tiles)`` array: the tiles
    some query sees (query ``i`` sees keys ``lo[i] .. hi[i]``)."""
    for seed in range(6):
        rng = random.Random(seed)
        T = rng.choice((2, 4, 8))
        # sequences one after another in the copy: whole prompts, and chunks after earlier ones
        seqs = [(rng.choice((0, 0, rng.randrange(1, 20))), rng.randrange(1, 25))
                for _ in range(rng.randrange(1, 6))]
        if seed == 0:
            seqs, T = [(0, 3), (2, 2)], 2
        total = [c + n for c, n in seqs]
        k_start = np.cumsum(total) - total
        lo = np.concatenate([np.full(n, s) for s, (c, n) in zip(k_start, seqs)])
        hi = np.concatenate([s + np.arange(c, c + n) for s, (c, n) in zip(k_start, seqs)])
        # sometimes a padding tile
        n_kv_tiles = -(-sum(total) // T) + (rng.randrange(2) if seed else 0)
        q_tiles = -(-len(lo) // T)
        got = fn(lo.copy(), hi.copy(), T, n_kv_tiles)
        got = as_tensor(got, (q_tiles, n_kv_tiles)).bool().numpy()
        keys = np.arange(n_kv_tiles * T)
        pairs = (keys[None, :] >= lo[:, None]) & (keys[None, :] <= hi[:, None])   # (queries, keys)
        pairs = np.pad(pairs, ((0, q_tiles * T - len(lo)), (0, 0)))
        want = pairs.reshape(q_tiles, T, n_kv_tiles, T).any(axis=(1, 3))
        if seed == 0:   # written out: queries 0, 1, 2 see keys 0-0, 0-1, 0-2; then a chunk
            # after 2 cached tokens: queries 3, 4 see keys 3-5, 3-6
            assert want.astype(int).tolist() == [[1, 0, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]]
        missing, extra = np.argwhere(want & ~got), np.argwhere(got & ~want)
        assert not len(missing), (f"T={T}, sequences {seqs}: query tile {missing[0][0]} sees key "
                                  f"tile {missing[0][1]} and you skip it")
        assert not len(extra), (f"T={T}, sequences {seqs}: you list key tile {extra[0][1]} for "
                                f"query tile {extra[0][0]}, whose queries see none of it")
        (n_part, part), (n_full, full) = attention.GatheredFlexAttention.tiles(lo, hi, q_tiles,
                                                                               n_kv_tiles, T)
        listed = np.zeros_like(want)
        for q in range(q_tiles):
            listed[q, np.r_[part[q, :n_part[q]], full[q, :n_full[q]]]] = True
        assert (listed == want).all(), "the engine's block mask and the rule disagree"
    ok("tiles to read: each query tile reads one run of key tiles, from its first query's lo "
        "to its last one's hi")


def check_head_rows(fn):
    """``fn(n)`` -> the rows the output head computes for ``n`` sampled sequences: the smallest
    power of two that holds them, at least 16; then in the paged engine on SmolLM2."""
    for n in range(1, 1025):
        got = fn(n)
        assert isinstance(got, int), f"{n} sequences: return a whole number of rows, not {got!r}"
        assert got >= n, f"{n} sequences: {got} rows cannot hold them"
        assert got >= 16 and got & (got - 1) == 0, (
            f"{n} sequences: {got} rows. Round up to a power of two, at least 16")
        assert got == 16 or got // 2 < n, (
            f"{n} sequences: {got} rows, but {got // 2} hold them too: the smallest power of two")
    padded = []

    def head_rows(n):
        rows = fn(n)
        padded.append((n, rows))
        return rows

    def setup(eng):
        eng.runner.head_rows = head_rows
    _serve_with("head rows", max_batch=6, setup=setup,
                reqs=chat_workload(smollm()[0].tokenizer, n=6, max_new_tokens=6))
    assert any(rows > n for n, rows in padded), "the check is broken: no step was padded"
    shapes = sorted({fn(n) for n in range(1, 513)})
    ok(f"head rows: right for n = 1 to 1,024; batches of up to 512 meet {len(shapes)} shapes "
        f"{shapes}; padded steps give the same answers")
