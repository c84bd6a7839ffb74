"""The peers: what a practitioner reaches for first, measured with the same instruments.

* ``hf-generate``: Hugging Face ``generate`` on left-padded static batches of ``max_batch``
  requests, each run until its longest request is done; step times come from a streamer.
* ``hf-cb``: Hugging Face continuous batching (``init_continuous_batching``, behind
  ``generate_batch``), requests added as they arrive. Its step log is rebuilt from per-token
  timestamps, so its slot utilisation is unknown (null)."""
from __future__ import annotations

import inspect
import logging
import time

import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from course_lib.engines.base import Engine
from course_lib.engines.runner import left_pad
from course_lib.measure.metrics import Step


class _WarmupFailures(logging.Handler):
    """Counts the warm-ups Hugging Face's engine gives up on (it logs them and serves on)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record):
        self.count += "Failed to warm up" in record.getMessage()


class _StepClock(BaseStreamer):
    """Records when ``generate`` hands out each step's tokens (the first call is the prompt)."""

    def __init__(self, clock):
        self.clock, self.times = clock, []

    def put(self, value):
        self.times.append(self.clock())

    def end(self):
        pass


class HFGenerateEngine(Engine):
    name = "hf-generate"
    step_source = "streamer"

    def _serve(self, requests):
        for i in range(0, len(requests), self.max_batch):
            batch = requests[i:i + self.max_batch]
            self.wait_until(max(r.arrival_s for r in batch))      # a static batch waits for all
            self.run_batch(batch)

    @torch.inference_mode()
    def run_batch(self, batch):
        dev, pad = self.hf.device, self.hf.config.pad_token_id
        pad = self.eos if pad is None else pad
        lens = [len(r.prompt_tokens) for r in batch]
        T, B = max(lens), len(batch)
        ids, start = left_pad([r.prompt_tokens for r in batch], pad)
        mask = (torch.arange(T) >= start[:, None]).long()
        # Stop at EOS only if every request wants that; otherwise cut each output afterwards.
        stop_at_eos = not any(r.ignore_eos for r in batch)
        config = GenerationConfig(max_new_tokens=max(r.max_new_tokens for r in batch),
                                  do_sample=False, pad_token_id=pad,
                                  eos_token_id=self.eos if stop_at_eos else None)
        clock = _StepClock(self.now)
        start = self.now()
        out = self.hf.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                               generation_config=config, streamer=clock)
        new, times, keep = out[:, T:].tolist(), clock.times[1:], []   # a time per position
        for req, row in zip(batch, new):
            rec, n = self.records[req.id], 0
            for n, token in enumerate(row[:req.max_new_tokens], start=1):
                rec.emit(token, times[n - 1])
                reason = self.is_done(req, token)
                if reason:
                    break
            rec.finish(reason, times[n - 1])
            self._bar.update(1)
            keep.append(n)
        # The step log: step 0 is the prefill, step i > 0 feeds output token i - 1 back in.
        for i in range(len(new[0])):
            live = [r for r, k in enumerate(keep) if i < k]
            pairs = [(0, n) for n in lens] if i == 0 else [(lens[r] + i - 1, 1) for r in live]
            self.steps.append(Step.of(times[i - 1] if i else start, times[i], pairs,
                                      decode_tokens=i and len(live), rows=B,
                                      slots=B if i else B * T, logit_rows=len(live),
                                      active=[batch[r].id for r in live]))


class HFContinuousEngine(Engine):
    name = "hf-cb"
    step_source = "timestamps"

    def __init__(self, loaded, max_batch: int = 1, max_memory_percent: float | None = None):
        super().__init__(loaded, max_batch)
        # HF sizes its KV-cache from the free memory (``max_memory_percent`` of it, its default when
        # None); on an H200 its CUDA-graph warm-up then runs out of memory and it serves without.
        self.max_memory_percent = max_memory_percent

    def _manager(self, max_new_tokens, eos):
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
        gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                               eos_token_id=eos, pad_token_id=self.eos)
        cuda = self.hf.device.type == "cuda"
        # on the CPU HF's default would reserve 60% of RAM for the KV-cache: size it instead
        sizes = {} if cuda else {"num_blocks": 256, "max_batch_tokens": 512}
        if self.max_memory_percent is not None:
            sizes["max_memory_percent"] = self.max_memory_percent
        cb = ContinuousBatchingConfig(max_requests_per_batch=self.max_batch, use_cuda_graph=cuda,
                                      **sizes)
        return self.hf.init_continuous_batching(generation_config=gen,
                                                continuous_batching_config=cb)

    def _serve(self, requests):      # not under inference_mode: HF's thread sets its own mode
        if not requests:
            return
        # Newer transformers take an EOS per request; older ones only the manager's (-1: none).
        shared_eos = -1 if all(r.ignore_eos for r in requests) else self.eos
        manager = self._manager(max(r.max_new_tokens for r in requests), shared_eos)
        per_request_eos = "eos_token_id" in inspect.signature(manager.add_request).parameters
        if hasattr(manager, "warmup") and not getattr(manager, "warmed_up", True):
            failures, hf_log = _WarmupFailures(), logging.getLogger("ContinuousBatchingLogger")
            hf_log.addHandler(failures)
            try:
                manager.warmup()        # capture CUDA graphs before the clock starts, as HF does
            finally:
                hf_log.removeHandler(failures)
            self.warmup_failures = failures.count     # in the run's metrics (bench.run)
        manager.start()
        self._t0 = time.perf_counter()   # once HF's manager is up; HF's timestamps read this clock
        by_id, pending, done = {r.id: r for r in requests}, list(requests), {}
        try:
            while len(done) < len(requests):
                while pending and pending[0].arrival_s <= self.now():
                    req = pending.pop(0)
                    eos = {"eos_token_id": -1 if req.ignore_eos else self.eos}
                    manager.add_request(req.prompt_tokens, request_id=req.id,
                                        max_new_tokens=req.max_new_tokens, record_timestamps=True,
                                        **(eos if per_request_eos else {}))
                wait = pending[0].arrival_s - self.now() if pending else 0.5
                result = manager.get_result(timeout=max(min(wait, 0.5), 0.001))
                if result is not None and result.is_finished():
                    done[result.request_id] = result
                    self._bar.update(1)
                elif result is None and not manager.is_running():
                    raise RuntimeError("Hugging Face's continuous batching thread stopped")
        finally:
            manager.stop(block=True)
            if hasattr(manager, "destroy"):
                manager.destroy()
        for rid, result in done.items():
            req, rec = by_id[rid], self.records[rid]
            times = [t - self._t0 for t in (result.timestamps or [])]
            for token, t in zip(result.generated_tokens, times):
                rec.emit(token, t)
            last = rec.output_tokens[-1] if rec.output_tokens else None
            rec.finish("eos" if last == self.eos and not req.ignore_eos else "length",
                       times[-1] if times else self.now())
        self.steps = rebuild_steps(list(by_id.values()), self.records)


def rebuild_steps(requests, records, gap_s: float = 2e-4) -> list:
    """A step log from per-token timestamps: tokens stamped within ``gap_s`` of each other came out
    of the same forward pass. A request's first token closes its prefill; the others are decodes."""
    groups = []         # of (time, index of the token in its request, request)
    for ev in sorted((t, i, req) for req in requests
                     for i, t in enumerate(records[req.id].token_times)):
        if groups and ev[0] - groups[-1][-1][0] <= gap_s:
            groups[-1].append(ev)
        else:
            groups.append([ev])
    steps, start = [], min((r.arrival_s for r in requests), default=0.0)
    for group in groups:
        pairs = [(len(r.prompt_tokens) + i - 1, 1) if i else (0, len(r.prompt_tokens))
                 for _, i, r in group]
        steps.append(Step.of(start, group[-1][0], pairs, active=[req.id for _, _, req in group],
                             decode_tokens=sum(i > 0 for _, i, _ in group)))
        start = group[-1][0]
    return steps
