"""No batching at all: one request at a time, the baseline every batching strategy is measured
against. Each request is one prefill step (all prompt tokens at once) and then one decode step per
new token, each a full read of the model's weights for a single token.
"""
from __future__ import annotations

import torch

from course_lib.engines.base import Engine
from course_lib.measure.metrics import Step
from course_lib.model.attention import PaddedAttention
from course_lib.model.kv_cache import ContiguousKVCache
from course_lib.model.llama import Llama


class SequentialEngine(Engine):
    name = "sequential"

    def __init__(self, loaded, max_batch: int = 1, model=None):
        super().__init__(loaded, max_batch)
        self.model = model if model is not None else Llama.from_hf(loaded.model)

    def _serve(self, requests):
        if not requests:
            return
        longest = max(len(r.prompt_tokens) + r.max_new_tokens for r in requests)
        cache = ContiguousKVCache(self.model.shape, 1, longest, self.model.dtype, self.model.device)
        for req in requests:
            self.wait_until(req.arrival_s)
            self.generate(req, cache)

    def generate(self, req, cache):
        """Prefill the prompt, then decode greedily until EOS or ``max_new_tokens``."""
        dev = self.model.device
        zero = torch.zeros(1, dtype=torch.long, device=dev)
        tokens, cached = list(req.prompt_tokens), 0     # fed in this step; in the cache before it
        while True:
            n = len(tokens)
            ids = torch.tensor([tokens], device=dev)                                # (1, n)
            write_at = torch.arange(cached, cached + n, device=dev)[None]
            start = self.now()
            attn = PaddedAttention(cache, [0], zero, write_at, n_cols=cached + n)
            hidden = self.model.hidden_states(ids, attn.positions, attn)
            token = int(self.model.logits(hidden[0, -1]).argmax())                 # greedy
            self.records[req.id].emit(token, self.now())
            self.steps.append(Step.of(start, self.now(), [(cached, n)],
                                      decode_tokens=int(cached > 0), active=[req.id]))
            reason = self.is_done(req, token)
            if reason:
                return self.finish(req, reason)
            tokens, cached = [token], cached + n
