"""Continuous batching the way servers do it: packed steps under a token budget, over a paged
KV-cache, with preemption when the cache is full.

Every step:
  1. decodes first: one token for every running sequence whose prompt is done;
  2. then prefill chunks, while the step has tokens left in its budget
     (``max_num_batched_tokens``): first sequences whose prompt is half done, then newcomers;
  3. one *packed* forward pass over all of it (no padding), attention through the block tables.
A sequence's blocks are allocated as it grows. When a decode needs a block and none is free, the
most recently admitted sequence is *preempted*: its blocks are freed and it goes back to the
front of the queue, to be recomputed later (prompt and answer so far) - never lost.

On CUDA (chapter 09) the step is split by kind: decodes go through the course's Triton paged
decode kernel and prefill chunks through FlexAttention (``attention="kernel"``, the default
there), a step made only of decodes is replayed as a CUDA graph (``course_lib.kernels.cuda_graphs``),
the next token is chosen on the GPU (``course_lib.model.sampling``), and the layer's elementwise work
runs in fused Triton kernels (``course_lib.kernels.fused``).

With an ``slo`` (chapter 08), an admission controller stands at the door: a newcomer joins only
if one more sequence keeps decode steps within the TPOT target, and a waiting request that can no
longer get its first token within the TTFT target is refused, with the reason
(``course_lib.engines.admission``).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from course_lib.engines.admission import AdmissionController, StepTimeModel
from course_lib.model.attention import PAGED_ATTENTION
from course_lib.kernels.cuda_graphs import DecodeGraphs
from course_lib.model.kv_cache import PagedKVCache, kv_bytes_per_token, to_device
from course_lib.model.llama import Llama
from course_lib.measure.metrics import Step
from course_lib.requests import RequestError
from course_lib.model.sampling import sample
from course_lib.engines.base import Engine


def chunk_sizes(pending: list, budget) -> list:
    """How a step's token budget is split among prompts waiting to be prefilled, in order: each
    takes what it still needs, until the budget is spent (later prompts get 0 this step)."""
    sizes = []
    for n in pending:
        take = int(min(n, budget))
        sizes.append(take)
        budget -= take
    return sizes


def packed_inputs(rows, last):
    """The input tokens of a packed step, as one tensor on ``last``'s device. ``rows``: per
    sequence, ``(its new tokens, src)``; with overlap the last of them may still be on the device
    (``None`` on the host: sampled by the step in flight), and then it is ``last[src]``."""
    flat, to, src = [], [], []
    for new, j in rows:
        if new[-1] is None:                  # not yet on the host: a placeholder, filled on the device
            to.append(len(flat) + len(new) - 1)
            src.append(j)
            new = new[:-1] + [0]
        flat += new
    tokens = to_device(flat, last.device)
    if to:                                   # one copy for both index lists
        at = to_device(to + src, last.device)
        tokens[at[:len(to)]] = last[at[len(to):]]
    return tokens


@dataclass(eq=False)       # a sequence is itself: `in`, `remove` compare identity, not token lists
class PagedSeq:
    req: object
    tokens: list = field(default_factory=list)    # prompt + answer so far: what the cache must hold
    cached: int = 0                                # of which in the cache
    # with ``overlap``, the last token may still be on the GPU: None here, and ``src`` says
    # where it is in the step's sampled tokens (``PagedEngine.last``)
    src: int = -1
    finished: bool = False

    @property
    def pending(self) -> int:
        """Tokens to feed before the next token can be sampled (1 for a decode)."""
        return len(self.tokens) - self.cached


class PagedEngine(Engine):
    name = "continuous"

    def __init__(self, loaded, max_batch: int = 8, max_num_batched_tokens: int | None = None,
                 block_size: int = 16, num_blocks: int | None = None, attention: str | None = None,
                 kv_memory_bytes: int | None = None, slo=None, step_cost=None, model=None,
                 cuda_graphs: bool | None = None, temperature: float = 0.0,
                 trace_blocks: bool | None = None, watermark: float = 0.0, fused: bool | None = None,
                 overlap: bool | None = None):
        super().__init__(loaded, max_batch)
        if max_num_batched_tokens is not None and max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1 token, got {block_size}")
        if num_blocks is not None and num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.budget, self.block_size, self.num_blocks = max_num_batched_tokens, block_size, num_blocks
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
        # the gather reference on the CPU; on CUDA the kernel for decodes, FlexAttention for prefill
        cuda = self.model.device.type == "cuda"
        attention = attention or ("kernel" if cuda else "gather")
        if attention not in PAGED_ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(PAGED_ATTENTION)}, got {attention!r}")
        self.attention, self.attention_cls = attention, PAGED_ATTENTION[attention]
        if cuda_graphs and not (cuda and attention == "kernel"):
            raise ValueError("cuda_graphs needs a CUDA device and attention='kernel'")
        # decode-only steps through fixed buffers (graphs on CUDA, eager elsewhere)
        self.decode_path = attention == "kernel"
        self.cuda_graphs = cuda and self.decode_path if cuda_graphs is None else cuda_graphs
        # the layer's elementwise work through fused Triton kernels (course_lib.kernels.fused)
        self.fused = cuda and self.decode_path if fused is None else fused
        if self.fused and not cuda:
            raise ValueError("fused needs a CUDA device (the kernels are Triton)")
        if hasattr(self.model, "fused"):
            self.model.fused = self.fused
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.temperature = temperature
        if not 0 <= watermark < 1:
            raise ValueError(f"watermark must be a fraction of the blocks in [0, 1), got {watermark}")
        self.watermark = watermark       # blocks kept free for growth when admitting (chapter 09)
        # schedule and launch the next step while the GPU runs this one (chapter 09)
        self.overlap = cuda and self.decode_path if overlap is None else overlap
        # the tokens each step samples stay on the device, where the next step reads them
        self.last = torch.zeros(max_batch, dtype=torch.long, device=self.model.device)
        self._to_host = [torch.zeros(max_batch, dtype=torch.long, pin_memory=cuda) for _ in range(2)]
        self._parity = 0
        # block tables after every step, for the pictures of chapter 07 (memory grows with steps)
        self.trace_blocks = not cuda if trace_blocks is None else trace_blocks
        self.cache = self.graphs = None
        self.slo, self.step_cost = slo, step_cost        # admission control, and its prior model
        self.preemptions = 0

    def blocks_for(self, requests) -> int:
        """The cache's blocks: ``num_blocks`` (or the memory budget), else room for every
        request at once (no preemption)."""
        return self.num_blocks or sum(-(-(len(r.prompt_tokens) + r.max_new_tokens)
                                        // self.block_size) for r in requests)

    def new_cache(self, requests) -> PagedKVCache:
        return PagedKVCache(self.model.shape, self.blocks_for(requests), self.block_size,
                            self.model.dtype, self.model.device)

    def setup(self, requests):
        """The cache for a run, and the decode graphs that read it. Both are kept from run to
        run while they fit (capturing graphs takes seconds), emptied at the start of each."""
        n_blocks = self.blocks_for(requests)
        if self.cache is None or self.cache.allocator.n_blocks < n_blocks or (
                self.num_blocks and self.cache.allocator.n_blocks != n_blocks):
            self.cache, self.graphs = self.new_cache(requests), None
        self.cache.reset()
        longest = max(len(r.prompt_tokens) + r.max_new_tokens for r in requests)
        width = min(self.cache.blocks_needed(longest), self.cache.allocator.n_blocks)
        if self.decode_path and (self.graphs is None or self.graphs.max_blocks < width):
            self.graphs = DecodeGraphs(self.model, self.cache, self.max_batch, width,
                                       self.temperature, graphs=self.cuda_graphs, last=self.last)

    def prepare(self, requests):
        """On CUDA, compile FlexAttention for every step size this run may take (and the decode
        kernel, for mixed steps), and capture the decode graphs."""
        if self.attention in ("flex", "gathered-flex", "kernel") and self.model.device.type == "cuda" and requests:
            most = self.budget or sum(sorted(len(r.prompt_tokens) + r.max_new_tokens
                                             for r in requests)[-self.max_batch:])
            self.setup(requests)
            self.attention_cls.precompile(self.cache, most, self.model.shape, self.model.dtype)

    def _serve(self, requests):
        self.preemptions = 0
        self.block_trace = []        # after each step: {sequence id: its block table}
        if not requests:
            return
        self.setup(requests)
        n_blocks = self.cache.allocator.n_blocks
        queue = deque()
        for req in requests:
            need = self.cache.blocks_needed(len(req.prompt_tokens) + req.max_new_tokens)
            if need > n_blocks:      # could never fit, even alone: refuse it, serve the rest
                rec = self.records[req.id]
                rec.finish_reason = "refused"
                rec.error = str(RequestError(
                    f"request {req.id!r} needs {need} KV-cache blocks of {self.block_size} tokens, "
                    f"the cache has {n_blocks}"))
                self._bar.update(1)
            else:
                queue.append(req)
        self.loop(queue)

    def loop(self, arrivals: deque):
        waiting, running = deque(), []
        self.admission, self.admitted = None, set()
        self.in_flight, self._last_end = None, 0.0
        self._clock_event = None
        if self.model.device.type == "cuda":     # the GPU's clock, read against the host's here
            torch.cuda.synchronize()
            self._clock_event = torch.cuda.Event(enable_timing=True)
            self._clock_event.record()
            self._clock_event.synchronize()
            self._clock_at = self.now()
        if self.slo is not None:
            self.admission = AdmissionController(self.slo, StepTimeModel(
                self.work_shape, self.dtype_bytes, prior=self.step_cost))
        while arrivals or waiting or running or self.in_flight:
            while arrivals and arrivals[0].arrival_s <= self.now():
                waiting.append(PagedSeq(arrivals[0], list(arrivals.popleft().prompt_tokens)))
            if self.admission:
                self.shed(waiting, running)
            batch = self.schedule(waiting, running)
            if not batch and self.in_flight:    # what may run next waits on the step in flight
                self.complete(running, waiting)
                continue
            while not batch and len(running) > 1:   # all stuck on a full cache: make room
                self.preempt(running[-1], running, waiting)
                batch = self.schedule(waiting, running)
            if batch:
                self.forward(batch, running, waiting)
            elif arrivals:
                self.wait_until(arrivals[0].arrival_s)
            elif waiting or running:
                raise RuntimeError("the scheduler found nothing to run")   # a bug, never a hang

    def schedule(self, waiting: deque, running: list) -> list:
        """Pick this step's ``(sequence, n_tokens)`` pairs: decodes first, then prefill chunks."""
        budget = self.budget or float("inf")
        decodes = [s for s in running if s.pending == 1]                   # 1. decodes
        if len(decodes) > budget:
            decodes = decodes[:int(budget)]
        if self.cache.grow_each([s.req.id for s in decodes]):    # the usual case: room for all
            batch = [(s, 1) for s in decodes]
            budget -= len(batch)
            decodes = []
        else:
            batch = []
        for seq in decodes:                   # else one by one, preempting the newest for room
            if budget < 1:
                break
            while not self.cache.can_grow(seq.req.id, 1):
                victim = running[-1]                                     # the newest goes back
                self.preempt(victim, running, waiting)
                if any(s is victim for s, _ in batch):   # already scheduled: not any more
                    batch = [(s, n) for s, n in batch if s is not victim]
                    budget += 1
                if victim is seq:
                    break
            if seq in running:
                self.cache.grow(seq.req.id, 1)
                batch.append((seq, 1))
                budget -= 1
        chunks = [s for s in running if s.pending > 1]                     # 2. unfinished prompts
        while waiting and len(running) < self.max_batch:                   #    and newcomers
            if waiting[0].tokens[-1] is None:   # (chapter 09) preempted while its last token was
                break                            # still on the GPU: it comes back once that is read
            if self.admission and not self.admit(waiting[0], running):
                break
            if self.watermark and running and not self.room_for(waiting[0]):
                break
            running.append(waiting.popleft())
            chunks.append(running[-1])
        for seq, n in zip(chunks, chunk_sizes([s.pending for s in chunks], budget)):
            while n > 0 and not self.cache.can_grow(seq.req.id, n):        # take what fits
                n //= 2
            if n < 1:
                continue
            self.cache.grow(seq.req.id, n)
            batch.append((seq, n))
        # newcomers that got nothing this step wait in the queue, in order (sets of ids: at
        # batch 512 a scan of the batch per newcomer costs milliseconds a step)
        newcomers = [s for s in chunks if s.cached == 0]
        if newcomers:
            in_batch = {id(s) for s, _ in batch}
            unserved = [s for s in newcomers if id(s) not in in_batch]
            if unserved:
                gone = {id(s) for s in unserved}
                running[:] = [s for s in running if id(s) not in gone]
                waiting.extendleft(reversed(unserved))
        return batch

    def room_for(self, seq) -> bool:
        """Would ``watermark`` of the cache's blocks stay free after this sequence's prompt? The
        free blocks are the running sequences' room to grow: admitting into the last of them
        means preempting (and recomputing a whole prompt) a few steps later."""
        alloc = self.cache.allocator
        return alloc.n_free - self.cache.blocks_needed(len(seq.tokens)) >= self.watermark * alloc.n_blocks

    def admit(self, seq, running) -> bool:
        """May the head of the queue join now? (Preempted sequences were admitted before.)"""
        if seq.req.id not in self.admitted:
            verdict, _ = self.admission.decide(len(seq.tokens), self.now() - seq.req.arrival_s,
                                               [len(s.tokens) for s in running])
            if verdict != "admit":
                return False
            self.admitted.add(seq.req.id)
        return True

    def shed(self, waiting: deque, running: list):
        """Refuse every waiting request that can no longer meet its TTFT target."""
        contexts = [len(s.tokens) for s in running]
        for seq in [s for s in waiting if s.req.id not in self.admitted]:
            verdict, why = self.admission.decide(len(seq.tokens), self.now() - seq.req.arrival_s,
                                                 contexts)
            if verdict == "refuse":
                waiting.remove(seq)
                self.records[seq.req.id].error = f"request {seq.req.id!r} refused: {why}"
                self.finish(seq.req, "refused")

    def preempt(self, seq, running, waiting):
        """Free a sequence's blocks; it will be recomputed (prompt and answer so far) later."""
        self.cache.release(seq.req.id)
        seq.cached = 0
        running.remove(seq)
        waiting.appendleft(seq)
        self.preemptions += 1

    def forward(self, batch, running, waiting):
        """Launch a step, then take in the tokens of the step before it: with ``overlap``, while
        this one runs on the GPU (the host's bookkeeping and the next schedule hide behind it);
        without, this step's own tokens, as soon as they are known."""
        launched = self.launch(batch, running)
        if self.in_flight:
            self.complete(running, waiting)
        self.in_flight = launched
        if not self.overlap:
            self.complete(running, waiting)

    @torch.inference_mode()     # no autograd bookkeeping: nothing here is ever differentiated
    def launch(self, batch, running) -> dict:
        """Queue one forward pass on the device and return without waiting for it. The tokens it
        samples land in ``self.last`` (where the next step's decodes read them) and start their
        way to the host; each sampled sequence gets a placeholder (None) until ``complete``."""
        start, dev = self.now(), self.model.device
        if self.graphs is not None and all(s.pending == 1 for s, _ in batch):   # decodes only
            rows = []
            for s, _ in batch:
                token = s.tokens[s.cached]
                rows.append((0 if token is None else token, s.cached, self.cache.tables[s.req.id],
                             s.src if token is None else -1))
            self.graphs.launch(rows)
            sampled, computed = list(range(len(batch))), self.graphs.bucket(len(batch))
        else:
            attn = self.attention_cls(self.cache, [(s.req.id, s.cached, n) for s, n in batch], dev)
            tokens = packed_inputs([(s.tokens[s.cached:s.cached + n], s.src) for s, n in batch], self.last)
            hidden = self.model.hidden_states(tokens, attn.positions, attn)
            sampled = [i for i, (s, n) in enumerate(batch) if s.cached + n == len(s.tokens)]
            if sampled:
                ends = attn.cu_seqlens[1:][to_device(sampled, dev)] - 1
                self.last[:len(sampled)] = sample(self.model.logits(hidden[ends]), self.temperature)
            computed = tokens.numel()
        host = self._to_host[self._parity]       # two buffers: the step before may be unread
        self._parity ^= 1
        host[:len(sampled)].copy_(self.last[:len(sampled)], non_blocking=True)
        event = end = None
        if dev.type == "cuda":                    # when the GPU is done with this step
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        else:                                     # elsewhere the step ran inside this call
            end = self.now()
        # the step's work, for the metrics (one pass: at batch 512 every pass costs the host)
        prefill_tokens = decode_tokens = attended = kv_read = 0
        for s, n in batch:
            if s.pending == 1 and s.cached >= len(s.req.prompt_tokens):
                decode_tokens += 1
            else:                                                        # prompts, and recomputes
                prefill_tokens += n
            attended += n * s.cached + n * (n + 1) // 2
            kv_read += s.cached
            s.cached += n
        stats = dict(rows=len(batch), slots=computed, prefill_tokens=prefill_tokens,
                     decode_tokens=decode_tokens, attended=attended, kv_read=kv_read,
                     logit_rows=len(sampled), active=[s.req.id for s, _ in batch])
        places = []
        for j, i in enumerate(sampled):
            seq = batch[i][0]
            places.append(len(seq.tokens))
            seq.tokens.append(None)
            seq.src = j
            if len(seq.tokens) - len(seq.req.prompt_tokens) >= seq.req.max_new_tokens:
                # its last token: it leaves now, and its blocks serve the next step (which the
                # GPU runs after this one, so nothing it still writes is overwritten early)
                self.cache.release(seq.req.id)
                running.remove(seq)
        return {"batch": batch, "sampled": sampled, "places": places, "host": host,
                "event": event, "end": end, "start": start, "stats": stats}

    def complete(self, running, waiting):
        """Wait for the step in flight, then emit its tokens and retire the finished sequences."""
        step, self.in_flight = self.in_flight, None
        end = step["end"]
        if step["event"] is not None:
            step["event"].synchronize()
            # the step ended when the GPU finished it, not when the host got round to looking
            # (with overlap the host may be busy launching the next step at that moment)
            end = self._clock_at + self._clock_event.elapsed_time(step["event"]) / 1e3
        elif end > self.now():            # a simulated GPU (course_lib.measure.simulator): wait for it
            self.sleep(end - self.now())
        now = self.now()
        end = now if end is None else min(end, now)
        tokens = step["host"][:len(step["sampled"])].tolist()
        # steps run back to back on the device: one starts when it is launched or when the one
        # before it ends, whichever is later
        self.steps.append(Step(max(step["start"], self._last_end), max(end, step["start"]), **step["stats"]))
        self._last_end = self.steps[-1].end_s
        for i, place, token in zip(step["sampled"], step["places"], tokens):
            seq = step["batch"][i][0]
            seq.tokens[place] = token
            if seq.finished:             # stopped at the token before (an EOS learnt one step late)
                continue
            self.records[seq.req.id].emit(token, now)
            reason = self.is_done(seq.req, token)
            if reason:
                seq.finished = True
                self.cache.release(seq.req.id)
                if seq in running:
                    running.remove(seq)
                elif seq in waiting:
                    waiting.remove(seq)
                self.finish(seq.req, reason)
        if self.trace_blocks:
            self.block_trace.append({sid: list(t) for sid, t in self.cache.tables.items()})
        if self.admission:
            self.admission.model.update(self.steps[-512:])
        # memory: tokens held against the token places of the blocks allocated for them
        self.steps[-1].kv_used = sum(self.cache.lengths.values())
        self.steps[-1].kv_reserved = (self.cache.allocator.n_blocks - self.cache.allocator.n_free) \
            * self.cache.block_size
