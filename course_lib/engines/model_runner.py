"""Runs a scheduled step (chapters 05-09): its tokens packed into one tensor, one forward pass
with attention through the block tables, the next tokens sampled on the device. With *overlap*
(chapter 09) ``launch`` queues a step and returns; ``collect`` reads its tokens (through a pinned
buffer) once the next step is launched, which reads them on the device (``last``)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from course_lib.kernels.cuda_graphs import DecodeGraphs
from course_lib.kernels.fused import OPS as FUSED_OPS
from course_lib.kernels.paged_decode import KernelPagedAttention
from course_lib.measure.metrics import Step
from course_lib.model.attention import (
    FlexPagedAttention,
    GatheredFlexAttention,
    PagedAttention,
    bucket,
)
from course_lib.model.kv_cache import to_device
from course_lib.model.llama import REFERENCE_OPS
from course_lib.model.sampling import sample

# a packed step's attention: the gather reference, FlexAttention on the cache in place or on a
# packed copy of the prompts' keys, and (CUDA) the decode kernel
ATTENTION = {"gather": PagedAttention, "flex": FlexPagedAttention,
             "gathered-flex": GatheredFlexAttention, "kernel": KernelPagedAttention}


def packed_inputs(rows, last):
    """A packed step's input tokens, on ``last``'s device, from ``(new tokens, src)`` per row; a
    last token still ``None`` (sampled by the step in flight, with overlap) is ``last[src]``."""
    flat, to, src = [], [], []
    for new, j in rows:
        if new[-1] is None:              # not yet on the host: a placeholder, filled on the device
            to.append(len(flat) + len(new) - 1)
            src.append(j)
            new = new[:-1] + [0]
        flat += new
    tokens = to_device(flat, last.device)
    if to:                                   # one copy for both index lists
        at = to_device(to + src, last.device)
        tokens[at[:len(to)]] = last[at[len(to):]]
    return tokens


def step_counts(plan, computed: int) -> dict:
    """A step's work, for its ``Step`` (before its tokens count as cached): decodes feed an answer
    token back; prompts and recomputed answers are prefill."""
    seqs = plan.seqs
    decodes = sum(s.cached >= len(s.req.prompt_tokens) for s in seqs
                  if plan.decode_only or s.pending == 1)
    return dict(pairs=[(s.cached, n) for s, n in plan], decode_tokens=decodes, slots=computed,
                logit_rows=len(plan.sampled), active=[s.req.id for s in seqs])


@dataclass
class InFlight:
    """A launched step: where its tokens land on the host, its end (CUDA ``event``, or ``end``)."""
    plan: object
    host: torch.Tensor
    start: float
    end: float | None
    event: object
    work: dict


class ModelRunner:
    """Runs steps of ``model`` over a paged cache for up to ``max_batch`` sequences."""

    def __init__(self, model, max_batch: int, attention: str | None = None,
                 cuda_graphs: bool | None = None, fused: bool | None = None,
                 overlap: bool | None = None, temperature: float = 0.0):
        self.model, self.max_batch = model, max_batch
        cuda = model.device.type == "cuda"
        attention = attention or ("kernel" if cuda else "gather")
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
        self.attention, self.attention_cls = attention, ATTENTION[attention]
        if cuda_graphs and not (cuda and attention == "kernel"):
            raise ValueError("cuda_graphs needs a CUDA device and attention='kernel'")
        # decode-only steps through fixed buffers (graphs on CUDA, eager elsewhere)
        self.decode_path = attention == "kernel"
        on = cuda and self.decode_path                  # the default of chapter 09's switches
        self.cuda_graphs, self.fused, self.overlap = (
            on if x is None else x for x in (cuda_graphs, fused, overlap))
        if self.fused and not cuda:
            raise ValueError("fused needs a CUDA device (the kernels are Triton)")
        if hasattr(model, "use_ops"):
            model.use_ops(FUSED_OPS if self.fused else REFERENCE_OPS)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.temperature = temperature
        # sampled tokens stay on the device; two pinned host buffers, as the last may be unread
        self.last = torch.zeros(max_batch, dtype=torch.long, device=model.device)
        self._to_host = [torch.zeros(max_batch, dtype=torch.long, pin_memory=cuda)
                         for _ in range(2)]
        self._parity = 0
        self.cache = self.decoder = None
        self.decode_forward = None     # a stand-in for a decode step's device work (bench/)
        self.now, self.sleep = time.perf_counter, time.sleep   # the engine lends its clock

    @property
    def compiles(self) -> bool:
        """Does a run compile kernels (FlexAttention, Triton) that ``precompile`` can do first?"""
        return self.model.device.type == "cuda" and self.attention != "gather"

    def setup(self, cache, max_blocks: int):
        """The next run's cache, and the decode graphs over it (kept while they fit)."""
        self.cache = cache
        if self.decode_path and (self.decoder is None or self.decoder.cache is not cache
                                 or self.decoder.max_blocks < max_blocks):
            self.decoder = DecodeGraphs(self.model, cache, self.max_batch, max_blocks,
                                        self.temperature, graphs=self.cuda_graphs, last=self.last,
                                        forward=self.decode_forward)

    @torch.inference_mode()
    def precompile(self, max_tokens: int):
        """Compile the attention for every step size up to ``max_tokens`` before a timed run, and
        run the output head once at each padded row count (``head_rows``)."""
        self.attention_cls.precompile(self.cache, max_tokens, self.model.shape, self.model.dtype)
        for rows in sorted({self.head_rows(n) for n in range(1, self.max_batch + 1)}):
            hidden = torch.zeros(rows, self.model.shape.hidden, dtype=self.model.dtype,
                                 device=self.model.device)
            sample(self.model.logits(hidden), self.temperature)

    def head_rows(self, n: int) -> int:
        """Rows the output head computes for ``n`` sampled sequences: on CUDA, a power of two
        (at least 16), all met in ``precompile``. cuBLAS prepares a kernel for each new row count
        on first use, and the host stalls on it in the middle of a step."""
        return bucket(n, 16) if self.model.device.type == "cuda" else n

    def begin(self, now, sleep):
        """A run starts, on the engine's clock (and, on CUDA, the GPU's clock read against it)."""
        self.now, self.sleep, self._last_end, self._clock_event = now, sleep, 0.0, None
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()
            self._clock_event = torch.cuda.Event(enable_timing=True)
            self._clock_event.record()
            self._clock_event.synchronize()
            self._clock_at = now()

    @torch.inference_mode()     # no autograd bookkeeping: nothing here is ever differentiated
    def launch(self, plan) -> InFlight:
        """Queue the step's forward pass on the device and return without waiting for it."""
        start, dev, sampled = self.now(), self.model.device, plan.sampled
        if self.decoder is not None and plan.decode_only:
            tables, rows = self.cache.tables, []
            for s in plan.seqs:
                token = s.tokens[s.cached]
                rows.append((0 if token is None else token, s.cached, tables[s.req.id],
                             s.src if token is None else -1))
            self.decoder.launch(rows)
            computed = self.decoder.bucket(len(rows))
        else:
            attn = self.attention_cls(self.cache, [(s.req.id, s.cached, n) for s, n in plan], dev)
            tokens = packed_inputs([(s.tokens[s.cached:s.cached + n], s.src) for s, n in plan],
                                   self.last)
            hidden = self.model.hidden_states(tokens, attn.positions, attn)
            if sampled:
                ends = attn.cu_seqlens[1:][to_device(sampled, dev)] - 1
                rows = hidden[ends]
                if pad := self.head_rows(len(sampled)) - len(sampled):
                    rows = F.pad(rows, (0, 0, 0, pad))
                logits = self.model.logits(rows)[:len(sampled)]
                self.last[:len(sampled)] = sample(logits, self.temperature)
            computed = tokens.numel()
        host = self._to_host[self._parity]
        self._parity ^= 1
        host[:len(sampled)].copy_(self.last[:len(sampled)], non_blocking=True)
        event = end = None
        if dev.type == "cuda":                    # when the GPU is done with this step
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        else:                                     # elsewhere the step ran inside this call
            end = self.now()
        return InFlight(plan, host, start, end, event, step_counts(plan, computed))

    def collect(self, step: InFlight) -> tuple:
        """Wait for a launched step: ``(its sampled tokens, its Step record)``."""
        end = step.end
        if step.event is not None:
            step.event.synchronize()
            # when the GPU finished it, not when the (overlapping) host got round to looking
            end = self._clock_at + self._clock_event.elapsed_time(step.event) / 1e3
        elif end > self.now():          # a simulated device (course_lib.measure.simulator)
            self.sleep(end - self.now())
        end = min(end, self.now())
        tokens = step.host[:len(step.plan.sampled)].tolist()
        # steps run back to back: one starts when launched or when the one before ends
        record = Step.of(max(step.start, self._last_end), max(end, step.start), **step.work)
        self._last_end = record.end_s
        return tokens, record
