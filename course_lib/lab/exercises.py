"""Checks for the notebooks' exercises. Each ``check_*`` calls the learner's function on fresh
inputs, compares with the course's reference, prints one line when it is right and raises
``AssertionError`` (with a hint) when it is not."""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
import random
import time

import torch
from transformers import LlamaConfig

from course_lib.model import models
from course_lib.model.kv_cache import kv_bytes_per_token
from course_lib.model.llama import LlamaShape, rms_norm


def _ok(msg):
    print(f"✓ {msg}")


def _same_mask(got, want, hint):
    got = torch.as_tensor(got).bool()
    assert got.shape == want.shape, f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    assert torch.equal(got, want), hint


def _configs():
    return {name: LlamaConfig(**p.config) for name, p in models.PRESETS.items()}


# ---------------------------------------------------------------- chapter 00
def check_rms_norm(fn):
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    for shape in [(5, 16), (2, 3, 64), (576,)]:
        x = torch.randn(*shape, generator=g) * 3
        w = torch.rand(shape[-1], generator=g) + 0.5
        got = fn(x, w, 1e-5)
        assert got is not None, "your function returns nothing"
        assert got.shape == x.shape, f"shape {tuple(got.shape)}, expected {tuple(x.shape)}"
        want = rms_norm(x, w, 1e-5)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (
            "values differ: divide x by sqrt(mean(x**2 over the last dimension) + eps), "
            "then multiply by the weight")
    _ok("rms_norm matches the model's normalisation")


def check_kv_cache_bytes(fn):
    for name, cfg in _configs().items():
        shape = LlamaShape.from_config(cfg)
        for n, b in [(1, 4), (random.randint(2, 5000), 2)]:
            want = n * kv_bytes_per_token(shape, b)
            got = fn(cfg, n, b)
            assert got == want, (
                f"{name}, {n} tokens at {b} bytes: got {got}, expected {want}. Hint: K and V, "
                "every layer, num_key_value_heads (not num_attention_heads) x head_dim")
    _ok("kv_cache_bytes is right for every preset (grouped-query attention included)")


# ---------------------------------------------------------------- chapter 01
def check_decode_intensity(fn):
    for n_params, bpp, batch in [(7e9, 2, 1), (7e9, 2, 8), (135e6, 4, 64), (1.2e9, 1, 3)]:
        want = 2 * n_params * batch / (n_params * bpp)
        got = fn(n_params, bpp, batch)
        assert got is not None and math.isclose(got, want, rel_tol=1e-9), (
            f"n_params={n_params:g}, bytes_per_param={bpp}, batch={batch}: got {got}, expected "
            f"{want:g}. Hint: 2 FLOPs per parameter per token; the weights are read once per step")
    _ok("decode_intensity: FLOPs per byte grow with the batch, bytes do not")


def check_crossover_batch(fn):
    for flops, bw, bpp in [(312e12, 2.0e12, 2), (989e12, 3.35e12, 2), (200e9, 30e9, 4),
                           (100e12, 1e12, 1)]:
        want = math.ceil(flops / bw * bpp / 2)
        got = fn(flops, bw, bpp)
        assert got == want, (
            f"peak {flops:g} FLOP/s, {bw:g} B/s, {bpp} bytes/param: got {got}, expected {want}. "
            "Hint: the smallest whole batch whose intensity reaches the ridge (peak FLOP/s over "
            "bandwidth)")
    _ok("crossover_batch: below it decode is memory-bound, above it compute-bound")


# ---------------------------------------------------------------- chapter 02
def check_left_pad(fn):
    from course_lib.engines.runner import left_pad
    for rows in [[[5, 6, 7], [8]], [[1], [2, 3], [4, 5, 6, 7]], [[9, 9]]]:
        got = fn(rows, 0)
        want = left_pad(rows, 0)
        assert got is not None and len(got) == 2, "return (tokens, start)"
        assert torch.equal(torch.as_tensor(got[0]), want[0]), (
            f"tokens for {rows}: got {got[0]}, expected {want[0].tolist()} (pads go on the left)")
        assert torch.equal(torch.as_tensor(got[1]), want[1]), (
            f"start for {rows}: got {got[1]}, expected {want[1].tolist()}")
    _ok("left_pad: every prompt ends in the last column")


def check_prefill_mask(fn):
    from course_lib.model.attention import padded_visibility
    for start in [[0], [2, 0], [3, 1, 0]]:
        start = torch.tensor(start)
        T = int(start.max()) + 3
        want = padded_visibility(start, torch.arange(T).expand(len(start), T), T)
        _same_mask(fn(start, T), want, f"start={start.tolist()}: a real token at column c sees "
                   "columns start..c; a padding token sees only itself")
    _ok("prefill_mask: causal, blind to padding, and no empty row")


# ---------------------------------------------------------------- chapter 03
def check_fits(fn):
    from course_lib.engines.dynamic import fits
    rng = random.Random()
    cases = [(10, 5, 10, 20), (11, 5, 10, 20), (3, 18, 10, 28), (3, 19, 10, 28)]
    cases += [tuple(rng.randint(1, 40) for _ in range(4)) for _ in range(50)]
    for case in cases:
        assert bool(fn(*case)) == fits(*case), (
            f"prompt_len, max_new_tokens, cursor, cache_len = {case}: expected {fits(*case)}")
    _ok("fits: the newcomer's prompt ends before the cursor and its answer fits after it")


# ---------------------------------------------------------------- chapter 04
def check_admit(fn):
    from collections import deque

    from course_lib.engines.continuous import admit
    from course_lib.requests import Request
    rng = random.Random()
    for _ in range(30):
        reqs = [Request(f"r{i}", [5], 1, arrival_s=t)
                for i, t in enumerate(sorted(rng.uniform(0, 2) for _ in range(rng.randint(0, 6))))]
        free = rng.sample(range(8), rng.randint(0, 4))
        now = rng.uniform(0, 2)
        q1, f1, q2, f2 = deque(reqs), list(free), deque(reqs), list(free)
        want = [(r.id, s) for r, s in admit(q1, f1, now)]
        got = [(r.id, s) for r, s in (fn(q2, f2, now) or [])]
        assert got == want, (f"queue arrivals {[r.arrival_s for r in reqs]}, free {free}, "
                             f"now {now:.2f}: got {got}, expected {want}")
        assert list(q2) == list(q1) and sorted(f2) == sorted(f1), "update the queue and free list"
    _ok("admit: arrived requests, oldest first, into the lowest free slots")


def check_slot_utilisation(fn):
    from course_lib.measure.metrics import Step
    rng = random.Random()
    for _ in range(20):
        steps = []
        for _ in range(rng.randint(1, 10)):
            slots = rng.randint(1, 50)
            useful = rng.randint(0, slots)
            p = rng.randint(0, useful)
            steps.append(Step(0, 1, rows=1, slots=slots, prefill_tokens=p, decode_tokens=useful - p,
                              attended=0, kv_read=0, logit_rows=0))
        want = sum(s.useful for s in steps) / sum(s.slots for s in steps)
        got = fn(steps)
        assert got is not None and math.isclose(got, want, rel_tol=1e-9), (
            f"got {got}, expected {want}: useful token slots (prefill + decode) over all slots")
    _ok("slot_utilisation: useful slots over slots computed")


def check_ttft_tpot(fn):
    from course_lib.measure.metrics import RequestRecord
    rng = random.Random()
    for _ in range(20):
        rec = RequestRecord("r", arrival_s=rng.uniform(0, 1), prompt_len=5)
        t = rec.arrival_s
        for _ in range(rng.randint(1, 8)):
            t += rng.uniform(0.01, 0.5)
            rec.emit(7, t)
        got = fn(rec.arrival_s, list(rec.token_times))
        assert got is not None and len(got) == 2, "return (ttft, tpot)"
        assert math.isclose(got[0], rec.ttft_s), f"TTFT: got {got[0]}, expected {rec.ttft_s}"
        if rec.tpot_s is None:
            assert got[1] is None, "TPOT of a one-token answer is undefined: return None"
        else:
            assert got[1] is not None and math.isclose(got[1], rec.tpot_s), (
                f"TPOT: got {got[1]}, expected {rec.tpot_s} (time between the first and the last "
                "token, over the number of gaps)")
    _ok("ttft_tpot: the two latencies a user feels")


# ---------------------------------------------------------------- chapters 02 and 04: the loops
_RUNS = {}     # the model, and the library engines' runs, loaded and made once per process


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
    """Serve short real chat requests with the learner's engine ``cls`` and with the library's
    ``base`` on SmolLM2; the greedy tokens must agree. Returns ``(requests by arrival, the
    learner's steps, its records by id)``."""
    from course_lib.model.llama import Llama
    from course_lib.requests import chat_workload
    assert isinstance(cls, type) and issubclass(cls, base), f"define a subclass of {base.__name__}"
    assert cls.schedule is not base.schedule, "write your own schedule method in your class"
    if "model" not in _RUNS:
        loaded = models.load("smollm2-135m")
        _RUNS["model"] = loaded, Llama.from_hf(loaded.model)
    loaded, model = _RUNS["model"]
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
    """``cls``: a ``StaticEngine`` subclass with its own ``schedule``. Same tokens as the library's
    engine, and the static rule in the step log: batches of ``max_batch`` in arrival order, each
    started once all of it has arrived and run to its longest answer with every row."""
    from course_lib.engines.static import StaticEngine
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
    _ok(f"static schedule ({len(order)} requests, max_batch={mb}): the library's tokens, "
        "batches in arrival order, each run to its longest answer")


def check_continuous_schedule(cls):
    """``cls``: a ``ContinuousEngine`` subclass with its own ``schedule``. Same tokens as the
    library's engine, and the continuous rule in the step log: nobody admitted before arriving,
    no free row while an arrived request waits, every running sequence in every decode step."""
    from course_lib.engines.continuous import ContinuousEngine
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
    _ok(f"continuous schedule ({len(order)} requests, max_batch={mb}): the library's tokens, "
        "every free row taken at the next iteration")


# ---------------------------------------------------------------- chapter 05
def check_chunk_sizes(fn):
    from course_lib.engines.scheduler import chunk_sizes
    rng = random.Random()
    cases = [([100, 30], 64), ([10, 20, 30], 64), ([5], 64), ([], 8), ([64, 1], 64)]
    cases += [([rng.randint(1, 300) for _ in range(rng.randint(0, 5))], rng.randint(1, 256))
              for _ in range(40)]
    for pending, budget in cases:
        want = chunk_sizes(pending, budget)
        got = fn(list(pending), budget)
        assert list(got or []) == want, (f"pending {pending}, budget {budget}: got {got}, "
                                         f"expected {want} (in order, each takes what it needs "
                                         f"or what is left)")
    _ok("chunk_sizes: the token budget, filled in order")


def check_steps_to_prefill(fn):
    rng = random.Random()
    for _ in range(50):
        p, b = rng.randint(1, 2000), rng.randint(2, 512)
        d = rng.randint(0, b - 1)
        want = math.ceil(p / (b - d))
        got = fn(p, b, d)
        assert got == want, (f"prompt {p}, budget {b}, {d} decoding: got {got}, expected {want}. "
                             "Hint: the decodes go first, the prompt gets what is left of each "
                             "step")
    _ok("steps_to_prefill: a bigger budget, fewer but longer steps")


@functools.cache
def _chat_reference(n: int = 4, new: int = 8):
    """SmolLM2 (real weights), ``n`` chat requests and Hugging Face's greedy answers to them."""
    from course_lib.requests import chat_workload
    loaded = models.load("smollm2-135m")
    reqs = chat_workload(loaded.tokenizer, n=n, max_new_tokens=new)
    out = [loaded.model.generate(torch.tensor([r.prompt_tokens]), max_new_tokens=new,
                                 do_sample=False)[0, len(r.prompt_tokens):] for r in reqs]
    return loaded, reqs, {r.id: o.tolist() for r, o in zip(reqs, out)}


def _serve_with(what: str, scheduler=None, blocks=None, **options):
    """The paged engine on SmolLM2 with a learner's scheduler or block manager class in it."""
    from course_lib.engines import make_engine
    loaded, reqs, want = _chat_reference()
    eng = make_engine("paged", loaded, max_batch=4, block_size=4, **options)
    eng.scheduler_class = scheduler or eng.scheduler_class
    eng.block_manager_class = blocks or eng.block_manager_class
    log = eng.run(reqs)
    for r in log.requests:
        assert r.output_tokens == want[r.id], (f"with your {what} in the engine, {r.id} answers "
                                               f"{r.output_tokens}, Hugging Face {want[r.id]}")
    return eng, log


def check_token_budget_step(fn):
    """``fn(running, budget)`` -> ``[(seq, tokens)]``: the step's tokens, one for each decode
    (``seq.pending == 1``) first, then prompt chunks in arrival order, never over ``budget``.
    Plugged into the paged engine's scheduler on SmolLM2 (chunked prefill): every plan must
    have these properties, and the answers must be Hugging Face's."""
    from course_lib.engines.scheduler import Scheduler, budget_step
    fed = {}                                    # request id -> [(first position, tokens)]

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
        return plan

    class Mine(Scheduler):
        budget_step = staticmethod(checked)

        def schedule(self):
            plan = super().schedule()
            for s, n in plan:
                fed.setdefault(s.req.id, []).append((s.cached, n))
            return plan
    _, log = _serve_with("token-budget step", Mine, max_num_batched_tokens=16)
    for r in log.requests:              # its prompt's chunks: all it was fed until its 1st token
        chunks = fed[r.id][:len(fed[r.id]) - len(r.output_tokens) + 1]
        assert [c for c, _ in chunks] + [r.prompt_len] == list(itertools.accumulate(
            (n for _, n in chunks), initial=0)), f"{r.id}: prompt chunks not contiguous, complete"
    assert any(len(fed[r.id]) > len(r.output_tokens) for r in log.requests), "nothing chunked"
    _ok("token-budget step: decodes first, then prompt chunks, in the real engine")


# ---------------------------------------------------------------- chapter 06
def check_cu_seqlens(fn):
    from course_lib.model.attention import cu_seqlens
    rng = random.Random()
    for lengths in [[3, 5, 2], [7], []] + [[rng.randint(1, 50) for _ in range(rng.randint(1, 8))]
                                           for _ in range(20)]:
        got = fn(list(lengths))
        assert list(got) == cu_seqlens(lengths), (
            f"lengths {lengths}: got {list(got)}, expected {cu_seqlens(lengths)}")
    _ok("cu_seqlens: where each sequence starts in the packed batch")


def check_packed_mask(fn):
    from course_lib.model.attention import block_diagonal_causal, cu_seqlens
    rng = random.Random()
    for lengths in [[3, 2], [1, 1, 1], [4]] + [[rng.randint(1, 6) for _ in range(rng.randint(1, 4))]
                                               for _ in range(10)]:
        seq = torch.tensor([i for i, n in enumerate(lengths) for _ in range(n)])
        pos = torch.tensor([p for n in lengths for p in range(n)])
        want = block_diagonal_causal(seq, pos, seq, pos)
        _same_mask(fn(cu_seqlens(lengths)), want, f"lengths {lengths}: token i sees token j when "
                   "they belong to the same sequence and j is not after i")
    _ok("packed_mask: block-diagonal and causal")


# ---------------------------------------------------------------- chapter 07
def check_block_slot(fn):
    rng = random.Random()
    for _ in range(50):
        bs = rng.randint(1, 32)
        table = rng.sample(range(100), rng.randint(1, 10))
        p = rng.randrange(len(table) * bs)
        want = table[p // bs] * bs + p % bs
        got = fn(table, p, bs)
        assert got == want, (f"block table {table}, position {p}, block size {bs}: got {got}, "
                             f"expected {want}. Hint: which block (p // block_size), where in it")
    _ok("block_slot: position -> block -> row of the cache")


def check_allocator(cls):
    from course_lib.engines.block_manager import BlockAllocator, OutOfBlocks
    rng = random.Random()
    for _ in range(20):
        n = rng.randint(1, 8)
        mine, ref, held = cls(n), BlockAllocator(n), []
        for _ in range(40):
            if held and rng.random() < 0.4:
                b, rb = held.pop(rng.randrange(len(held)))
                mine.free(b)
                ref.free(rb)
            else:
                try:
                    want = ref.allocate()
                except OutOfBlocks:
                    try:
                        mine.allocate()
                    except Exception:
                        continue
                    raise AssertionError(f"all {n} blocks are in use: allocate() must raise")
                got = mine.allocate()
                assert got not in [b for b, _ in held], f"block {got} was handed out twice"
                assert 0 <= got < n, f"block {got} does not exist ({n} blocks)"
                held.append((got, want))
            assert mine.n_free == ref.n_free, f"n_free is {mine.n_free}, expected {ref.n_free}"
    _ok("allocator: no block twice, every freed block reusable")


def check_block_manager(cls):
    """``cls(n_blocks, block_size)``: a ``BlockManager``-shaped class. On a small case, then in
    the paged engine on SmolLM2 with too few blocks for all (preemptions): after every change,
    sound tables; after the run, every block back and Hugging Face's answers."""
    from course_lib.engines.block_manager import OutOfBlocks

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
    _ok(f"block manager: {eng.preemptions} preemptions, every block back, the same answers")


def check_victim(fn):
    """``fn(running)`` -> the running sequence to preempt when a decode finds no free block:
    the newest (``running`` is in the order of admission). Plugged into the paged engine on
    SmolLM2 with a cache too small for all at once; the answers must be Hugging Face's."""
    from course_lib.engines.scheduler import Scheduler

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
    _ok(f"victim: {eng.preemptions} preemptions of the newest, the same answers")


def check_block_key(fn):
    """``fn(prev, tokens)`` -> the name of a full block: the same for the same tokens after the
    same prefix (``prev``: the name of the block before, None for the first), different when
    either differs. Plugged into the prefix cache of the paged engine on SmolLM2: prompts that
    share a block of tokens after different prefixes must keep Hugging Face's answers, and a
    prompt that repeats an earlier one's prefix must find it in the cache."""
    from course_lib.engines import make_engine
    from course_lib.engines.prefix_cache import PrefixCachingBlockManager
    from course_lib.requests import Request
    a, b, x = [5, 6, 7, 8], [9, 10, 11, 12], [1, 2, 3, 4]
    assert fn(None, a) == fn(None, list(a)), "the same tokens must get the same name"
    assert fn(None, a) != fn(None, b) and fn(None, a) != fn(None, a[:-1] + [99]), (
        "different tokens must get different names (all of them count)")
    assert fn(fn(None, a), x) != fn(fn(None, b), x), (
        "the same block after different prefixes got the same name: their keys and values "
        "differ (attention saw different tokens before). Chain prev into the name")

    class Mine(PrefixCachingBlockManager):
        block_key = staticmethod(fn)
    loaded, _, _ = _chat_reference()

    def words(text):
        return loaded.tokenizer(text, add_special_tokens=False)["input_ids"][:8]
    first = words("The library opens at nine on weekdays and at ten on Saturdays")
    second = words("Our museum closes early on Sundays and on every public holiday")
    shared = words("and the reading room stays quiet for those who study there all day")
    ask = words("What time is it now, please?")
    prompts = [first + shared + ask, second + shared + ask, second + shared + words("Who are you")]
    assert {len(first), len(second), len(shared)} == {8}, "the check is broken: 8-token parts"
    reqs = [Request(f"p{i}", p, max_new_tokens=6) for i, p in enumerate(prompts)]
    eng = make_engine("paged", loaded, max_batch=1, block_size=4)    # one at a time: each
    eng.block_manager_class = Mine                                    # finds the ones before
    log = eng.run(reqs)
    for r, rec in zip(reqs, log.requests):
        want = loaded.model.generate(torch.tensor([r.prompt_tokens]), max_new_tokens=6,
                                     do_sample=False)[0, len(r.prompt_tokens):].tolist()
        assert rec.output_tokens == want, (
            f"with your names in the prefix cache, {r.id} answers {rec.output_tokens}, Hugging "
            f"Face {want}: a block was shared that holds other keys and values")
    assert eng.prefix_hit_tokens >= len(second + shared), (
        f"the last prompt repeats the second's first {len(second + shared)} tokens, and found "
        f"{eng.prefix_hit_tokens} in the cache")
    _ok(f"block_key: {eng.prefix_hit_tokens} prompt tokens from the cache, the same answers")


# ---------------------------------------------------------------- chapter 08
def check_percentile_latency(fn):
    """``fn(values, q)``: the q-th percentile (0-100) with linear interpolation between ranks,
    as numpy's default; None for no values."""
    import numpy as np
    rng = random.Random()
    assert fn([], 50) is None, "no values: return None"
    for _ in range(30):
        values = [rng.expovariate(5.0) for _ in range(rng.randint(1, 40))]
        q = rng.choice([50, 90, 99, rng.uniform(0, 100)])
        want = float(np.percentile(values, q))
        got = fn(list(values), q)
        assert got is not None and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12), (
            f"p{q:.3g} of {len(values)} values: got {got}, expected {want}. Sort them; the "
            "percentile sits at rank (n - 1) * q / 100, between two values when it is not whole")
    _ok("percentile: p50, p90, p99 from raw latencies")


def check_goodput(fn):
    """``fn(records, ttft_slo, tpot_slo)``: requests served within both targets per second, from
    the first arrival to the last finish of a served request."""
    from course_lib.engines.policies import SLO
    from course_lib.measure.metrics import RequestRecord, RunLog, goodput
    rng = random.Random()
    for _ in range(20):
        recs = []
        for i in range(rng.randint(2, 12)):
            rec = RequestRecord(f"r{i}", arrival_s=rng.uniform(0, 2), prompt_len=4)
            if rng.random() < 0.2:
                rec.finish("refused", rec.arrival_s)
            else:
                t = rec.arrival_s
                for _ in range(rng.randint(1, 6)):
                    t += rng.uniform(0.01, 0.4)
                    rec.emit(5, t)
                rec.finish("length", t)
            recs.append(rec)
        ttft, tpot = rng.uniform(0.05, 0.5), rng.uniform(0.05, 0.3)
        want = goodput(RunLog("x", recs, [], 0.0), SLO(ttft, tpot))["goodput_rps"]
        got = fn(recs, ttft, tpot)
        assert (got is None) == (want is None) and (want is None or math.isclose(got, want)), (
            f"got {got}, expected {want}: count served requests with TTFT <= {ttft:.3g} "
            f"and TPOT <= {tpot:.3g} (a one-token answer has no TPOT: it meets that target), "
            "over the time from the first arrival to the last finish of a served request")
    _ok("goodput: what a user counts, not what the GPU does")


def check_admission_rule(fn):
    """``fn(waited_s, first_token_s, decode_step_s, ttft_slo, tpot_slo)`` -> "admit", "queue" or
    "refuse": refuse what cannot meet the TTFT target even if admitted now; queue what would make
    decode steps slower than the TPOT target; admit the rest. Checked on cases, then as the rule
    of the paged engine's admission controller, serving an overload on a simulated clock."""
    from unittest import mock

    from course_lib.engines.policies import SLO, AdmissionController
    from course_lib.measure.costmodel import FEATURES, StepCost
    from course_lib.measure.simulator import simulate
    from course_lib.requests import Request, poisson_arrivals

    class Fixed:
        def __init__(self, first, step):
            self.first, self.step = first, step

        def predict(self, rows, tokens, attended, kv_read):
            return self.first if tokens > rows else self.step       # a prefill step, or a decode
    rng = random.Random()
    seen = set()
    for _ in range(200):
        waited, first, step = rng.uniform(0, 1), rng.uniform(0.01, 0.5), rng.uniform(0.005, 0.1)
        ttft, tpot = rng.uniform(0.1, 1.0), rng.uniform(0.01, 0.08)
        want = AdmissionController(SLO(ttft, tpot), Fixed(first, step)).decide(8, waited, [20])[0]
        got = fn(waited, first, step, ttft, tpot)
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
            logs[name] = simulate("paged", reqs, cost, LlamaShape.from_config(
                _configs()["smollm2-135m"]), 2, 32, slo=slo, step_cost=cost)[1]
    served = [r for r in logs["yours"].requests if r.finish_reason == "length"]
    assert all(r.ttft_s <= slo.ttft_s + 1e-9 for r in served), (
        "a request you admitted got its first token after the TTFT target")
    assert all(r.tpot_s <= slo.tpot_s + 1e-9 for r in served), "decode steps over the TPOT target"
    fates = {k: [r.finish_reason for r in log.requests] for k, log in logs.items()}
    assert fates["yours"] == fates["course"], (
        f"you serve {fates['yours'].count('length')} of {len(reqs)} requests, the course's rule "
        f"{fates['course'].count('length')}, all on time: refuse only what would be late")
    _ok(f"admission rule, in the engine: {len(served)} of {len(reqs)} served on time, the rest "
        "refused at once")


# ---------------------------------------------------------------- chapter 09
def check_tile_slots(fn):
    """``fn(table, start, block_n, block_size, end)`` -> ``(slots, valid)``: the cache slots of
    tokens ``start .. start + block_n - 1`` of a sequence (one iteration of the decode kernel)
    and which of them are real (``< end``); masked-off entries may hold anything."""
    from course_lib.engines.block_manager import BlockManager
    from course_lib.model.kv_cache import PagedKVCache
    from course_lib.model.llama import LlamaShape
    rng = random.Random()
    shape = LlamaShape(10, 4, 8, 1, 2, 1, 2, 1e4, 1e-5, 0, 4096)
    for block_size in (1, 7, 16):
        cache = PagedKVCache(shape, BlockManager(400, block_size))
        for step in range(60):                       # three sequences growing side by side
            for sid in range(3):
                cache.grow(sid, rng.randint(1, 3))
        for sid in range(3):
            n = cache.lengths[sid]
            table = torch.tensor(cache.tables[sid])
            for start in (0, rng.randrange(n), (n // 2) // 8 * 8):
                block_n = rng.choice((8, 16, 64))
                got = fn(table, start, block_n, block_size, n)
                assert got is not None and len(got) == 2, "return (slots, valid)"
                slots, valid = (torch.as_tensor(t) for t in got)
                pos = torch.arange(start, start + block_n)
                want_valid = pos < n
                assert slots.shape == (block_n,) and valid.shape == (block_n,), \
                    f"shapes {tuple(slots.shape)}, {tuple(valid.shape)}; expected ({block_n},) each"
                assert torch.equal(valid.bool(), want_valid), "valid: the tokens before `end`"
                want = torch.tensor(cache.slots(sid, start, min(n, start + block_n)),
                                    dtype=torch.long)
                assert torch.equal(slots[want_valid].long(), want), (
                    f"block size {block_size}, tokens {start}..: slot = table[t // block_size] * "
                    f"block_size + t % block_size")
    _ok("tile slots: the kernel's address arithmetic, with the tail masked")


def check_combine_splits(fn):
    """``fn(m, l, o)`` -> the attention output from split partial results: per split ``s``, the
    running max ``m[s]``, the sum ``l[s]`` of ``exp(score - m[s])`` and the unnormalised
    ``o[s] = sum exp(score - m[s]) v`` (shapes ``(S,)``, ``(S,)``, ``(S, d)``)."""
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
        got = fn(m, l, o)
        assert got is not None, "your function returns nothing"
        got = torch.as_tensor(got, dtype=torch.float64)
        assert got.shape == (d,), f"shape {tuple(got.shape)}, expected ({d},)"
        assert not got.isnan().any(), "NaN: an empty split (m = -inf, l = 0) must weigh 0"
        assert torch.allclose(got, want, atol=1e-9), (
            "rescale each split by exp(m[s] - max(m)), then sum o and l over splits and divide")
    _ok("split combine: the same softmax, in pieces")


def check_packed_inputs(fn):
    """``fn(rows, last)`` -> a packed step's input tokens: per sequence ``(new tokens, src)``,
    the last new token ``None`` when it is still on the device, at ``last[src]``."""
    from course_lib.engines.model_runner import packed_inputs
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
        got = fn(rows, last)
        assert got is not None, "your function returns nothing"
        assert [list(new) for new, _ in rows] == before, "leave the rows as they are"
        want = packed_inputs(rows, last)
        if seed == 0:       # written out, so that the check does not rest on the engine alone
            assert want.tolist() == [last[5].item(), last[2].item(), 7, 8, 9]
        got = torch.as_tensor(got).long()
        assert got.shape == want.shape, (f"shape {tuple(got.shape)}, expected "
                                         f"{tuple(want.shape)}: one per new token")
        assert torch.equal(got, want), (f"rows {rows}: the known tokens in order, and last[src] "
                                        f"where a token is None")
    _ok("packed inputs: the tokens still on the device taken from where they are")


def check_tiles_to_read(fn):
    """``fn(lo, hi, T, n_kv_tiles)`` -> a boolean ``(query tiles, key tiles)`` array: which tiles of
    a packed copy some query sees, where query ``i`` sees keys ``lo[i] .. hi[i]`` (chapter 09's
    ``GatheredFlexAttention``). Checked against every (query, key) pair of the rule, and against
    the block mask the engine lists (its partial tiles plus its full ones)."""
    import numpy as np

    from course_lib.model.attention import GatheredFlexAttention
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
        got = fn(lo.copy(), hi.copy(), T, n_kv_tiles)
        assert got is not None, "your function returns nothing"
        got = np.asarray(got).astype(bool)
        q_tiles = -(-len(lo) // T)
        assert got.shape == (q_tiles, n_kv_tiles), (f"shape {got.shape}, expected "
                                                    f"{(q_tiles, n_kv_tiles)}")
        keys = np.arange(n_kv_tiles * T)
        pairs = (keys[None, :] >= lo[:, None]) & (keys[None, :] <= hi[:, None])   # (queries, keys)
        pairs = np.pad(pairs, ((0, q_tiles * T - len(lo)), (0, 0)))
        want = pairs.reshape(q_tiles, T, n_kv_tiles, T).any(axis=(1, 3))
        if seed == 0:   # written out: queries 0, 1, 2 see keys 0-0, 0-1, 0-2; then a chunk
            # after 2 cached tokens: queries 3, 4 see keys 3-5, 3-6
            assert want.astype(int).tolist() == [[1, 0, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]]
        missing, extra = want & ~got, got & ~want
        assert not missing.any(), (f"T={T}, sequences {seqs}: query tile "
                                   f"{np.argwhere(missing)[0][0]} sees key tile "
                                   f"{np.argwhere(missing)[0][1]} and you skip it")
        assert not extra.any(), (f"T={T}, sequences {seqs}: you list key tile "
                                 f"{np.argwhere(extra)[0][1]} for query tile "
                                 f"{np.argwhere(extra)[0][0]}, whose queries see none of it")
        (n_part, part), (n_full, full) = GatheredFlexAttention.tiles(lo, hi, q_tiles, n_kv_tiles, T)
        listed = np.zeros_like(want)
        for q in range(q_tiles):
            listed[q, part[q, :n_part[q]]] = True
            listed[q, full[q, :n_full[q]]] = True
        assert (listed == want).all(), "the engine's block mask and the rule disagree"
    _ok("tiles to read: each query tile reads one run of key tiles, from its first query's lo "
        "to its last one's hi")
