"""Continuous batching the way servers do it (chapters 05-09): packed steps under a token budget,
over a paged KV-cache, with preemption when it is full. ``PagedEngine`` runs the loop: take in
arrivals, have the ``scheduler`` plan a step and the ``model_runner`` run it, hand tokens back."""
from __future__ import annotations

from collections import deque

from course_lib.engines.base import Engine
from course_lib.engines.block_manager import BlockManager
from course_lib.engines.model_runner import ModelRunner
from course_lib.engines.policies import AdmissionController, StepTimeModel, Watermark
from course_lib.engines.prefix_cache import PrefixCachingBlockManager
from course_lib.engines.scheduler import Scheduler
from course_lib.engines.sequence import Sequence
from course_lib.model.kv_cache import PagedKVCache, kv_bytes_per_token
from course_lib.model.llama import Llama


class PagedEngine(Engine):
    name = "paged"
    # its parts, as classes: an instance may take others (a learner's own, chapters 05 and 07)
    scheduler_class, block_manager_class = Scheduler, BlockManager

    def __init__(self, loaded, max_batch: int = 8, max_num_batched_tokens: int | None = None,
                 block_size: int = 16, num_blocks: int | None = None, attention: str | None = None,
                 kv_memory_bytes: int | None = None, slo=None, step_cost=None, model=None,
                 cuda_graphs: bool | None = None, temperature: float = 0.0,
                 trace_blocks: bool | None = None, watermark: float = 0.0,
                 fused: bool | None = None, overlap: bool | None = None,
                 prefix_caching: bool = False):
        super().__init__(loaded, max_batch)
        for name, value in (("max_num_batched_tokens", max_num_batched_tokens),
                            ("block_size", block_size), ("num_blocks", num_blocks)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block_size, self.num_blocks = block_size, num_blocks
        self.model = model if model is not None else Llama.from_hf(loaded.model)
        # the model that memory and step costs are counted for (a SimModel's: the simulated one)
        self.work_shape = getattr(self.model, "cost_shape", self.model.shape)
        self.dtype_bytes = getattr(self.model, "dtype_bytes", self.model.dtype.itemsize)
        if kv_memory_bytes is not None:          # a memory budget instead of a block count
            if num_blocks is not None:
                raise ValueError("give num_blocks or kv_memory_bytes, not both")
            per_block = block_size * kv_bytes_per_token(self.work_shape, self.dtype_bytes)
            if kv_memory_bytes < per_block:
                raise ValueError(f"kv_memory_bytes={kv_memory_bytes} cannot hold one block of "
                                 f"{block_size} tokens ({per_block} bytes)")
            self.num_blocks = kv_memory_bytes // per_block
        self.runner = ModelRunner(self.model, max_batch, attention, cuda_graphs, fused, overlap,
                                  temperature)
        self.attention, self.overlap = self.runner.attention, self.runner.overlap
        self.watermark, self.prefix_caching = Watermark(watermark), bool(prefix_caching)
        if prefix_caching:                  # chapter 07: shared prefixes share their blocks
            if self.attention == "flex":    # its mask gives each block one sequence
                raise ValueError("attention='flex' cannot read a block that sequences share; "
                                 "with prefix_caching use 'gather' or 'kernel'")
            self.block_manager_class = PrefixCachingBlockManager
        # block tables after every step, for the pictures of chapter 07 (memory grows with steps)
        self.trace_blocks = self.model.device.type != "cuda" if trace_blocks is None \
            else trace_blocks
        self.slo, self.step_cost = slo, step_cost        # admission control, and its prior model
        self.cache = self.scheduler = self.admission = None

    @property
    def preemptions(self) -> int:
        return self.scheduler.preemptions if self.scheduler else 0

    @property
    def prefix_hit_tokens(self) -> int:
        """Prompt tokens a run took from the prefix cache instead of computing them."""
        return getattr(self.cache.blocks, "hit_tokens", 0) if self.cache else 0

    def blocks_for(self, requests) -> int:
        """``num_blocks`` (or the memory budget), else room for every request at once."""
        bs = self.block_size
        return self.num_blocks or sum(-(-(len(r.prompt_tokens) + r.max_new_tokens) // bs)
                                      for r in requests)

    def new_cache(self, requests) -> PagedKVCache:
        blocks = self.block_manager_class(self.blocks_for(requests), self.block_size)
        return PagedKVCache(self.model.shape, blocks, self.model.dtype, self.model.device)

    def setup(self, requests):
        """The run's cache (kept from run to run while it fits), emptied, and the decode graphs."""
        n_blocks = self.blocks_for(requests)
        have = self.cache.blocks.n_blocks if self.cache else 0
        if have < n_blocks or (self.num_blocks and have != n_blocks):
            self.cache = self.new_cache(requests)
        blocks = self.cache.blocks
        blocks.reset()
        longest = max(len(r.prompt_tokens) + r.max_new_tokens for r in requests)
        self.runner.setup(self.cache, min(blocks.blocks_needed(longest), blocks.n_blocks))

    def prepare(self, requests):
        """On CUDA, compile the attention for every step size a run may take; capture graphs."""
        if self.runner.compiles and requests:
            most = self.max_num_batched_tokens or sum(sorted(
                len(r.prompt_tokens) + r.max_new_tokens for r in requests)[-self.max_batch:])
            self.setup(requests)
            self.runner.precompile(most)

    def _serve(self, requests):
        self.block_trace = []        # after each step: {sequence id: its block table}
        self.scheduler = None
        if not requests:
            return
        self.setup(requests)
        blocks, arrivals = self.cache.blocks, deque()
        for req in requests:
            need = blocks.blocks_needed(len(req.prompt_tokens) + req.max_new_tokens)
            if need > blocks.n_blocks:      # could never fit, even alone: refuse it, serve the rest
                rec = self.records[req.id]
                rec.finish_reason, rec.error = "refused", (
                    f"request {req.id!r} needs {need} KV-cache blocks of {self.block_size} tokens, "
                    f"the cache has {blocks.n_blocks}")
                self._bar.update(1)
            else:
                arrivals.append(req)
        policies, self.admission = [], None
        if self.slo is not None:
            self.admission = AdmissionController(self.slo, StepTimeModel(
                self.work_shape, self.dtype_bytes, prior=self.step_cost), clock=self.now)
            policies.append(self.admission)
        if self.watermark.fraction:
            policies.append(self.watermark)
        self.scheduler = self.scheduler_class(blocks, self.max_batch, self.max_num_batched_tokens,
                                              policies)
        self.runner.begin(self.now, self.sleep)
        self.loop(arrivals)

    def loop(self, arrivals: deque):
        sched, self.in_flight = self.scheduler, None
        while arrivals or sched.waiting or sched.running or self.in_flight:
            while arrivals and arrivals[0].arrival_s <= self.now():
                sched.waiting.append(Sequence.of(arrivals.popleft()))
            for seq, why in sched.shed():
                self.records[seq.req.id].error = why
                self.finish(seq.req, "refused")
            plan = sched.schedule()
            if not plan and self.in_flight:     # what may run next waits on the step in flight
                self.complete()
                continue
            # the scheduler preempts for decodes; when nothing fits and no step in flight can
            # free blocks, the engine preempts
            while not plan and len(sched.running) > 1:
                sched.preempt(sched.victim())
                plan = sched.schedule()
            if plan:
                self.step(plan)
            elif arrivals:
                self.wait_until(arrivals[0].arrival_s)
            elif sched.waiting or sched.running:
                raise RuntimeError("the scheduler found nothing to run")   # a bug, never a hang

    def step(self, plan):
        """Launch a step, then take in the tokens of the step before it: with ``overlap``, while
        this one runs on the GPU (the host's bookkeeping and the next schedule hide behind it);
        without, this step's own tokens, as soon as they are known."""
        queued = self.runner.launch(plan)     # reads each sequence's ``cached`` tokens: first,
        places = self.scheduler.launched(plan)     # as this advances ``cached``
        if self.in_flight:
            self.complete()
        self.in_flight = queued, places
        if not self.overlap:
            self.complete()

    def complete(self):
        """Wait for the step in flight, then emit its tokens and retire the finished sequences."""
        (step, places), self.in_flight = self.in_flight, None
        tokens, record = self.runner.collect(step)
        self.steps.append(record)
        now = self.now()

        def emit(seq, token):
            self.records[seq.req.id].emit(token, now)
            return self.is_done(seq.req, token)
        for seq, reason in self.scheduler.postprocess(step.plan, places, tokens, emit):
            self.finish(seq.req, reason)
        blocks = self.cache.blocks
        if self.trace_blocks:
            self.block_trace.append({sid: list(t) for sid, t in blocks.tables.items()})
        if self.admission:
            self.admission.model.update(self.steps)
        # memory: tokens held against the token places of the blocks allocated for them
        record.kv_used = getattr(blocks, "tokens_held", None) or sum(blocks.lengths.values())
        record.kv_reserved = (blocks.n_blocks - blocks.n_free) * blocks.block_size
