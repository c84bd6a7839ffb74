"""What the batching engines of chapters 02-04 share: sequences (``Seq``) in cache slots, and a
padded forward pass that logs every token slot it computed and which of them were useful."""
from __future__ import annotations

from dataclasses import dataclass

from course_lib.engines.base import Engine
from course_lib.engines.runner import PaddedRunner
from course_lib.measure.metrics import Step
from course_lib.model.llama import Llama


@dataclass
class Seq:
    req: object
    slot: int
    start: int                 # first real cache column of this sequence
    next_col: int = 0          # cache column of the next token to feed in
    last: int | None = None    # last token emitted (fed back at the next decode step)
    done: bool = False

    @property
    def context(self) -> int:       # real tokens already in the cache
        return self.next_col - self.start


class PaddedEngine(Engine):
    """Base of the static, dynamic and continuous engines (subclasses write ``schedule``)."""

    def __init__(self, loaded, max_batch: int = 8, model=None):
        super().__init__(loaded, max_batch)
        self.model = model if model is not None else Llama.from_hf(loaded.model)

    def cache_len(self, requests) -> int:
        """Columns each cache row needs (the static layout's: longest prompt + longest output)."""
        return max(len(r.prompt_tokens) for r in requests) + max(r.max_new_tokens for r in requests)

    def _serve(self, requests):
        if requests:
            self.runner = PaddedRunner(self.model, self.max_batch, self.cache_len(requests),
                                       self.eos)
            self.schedule(requests)

    def schedule(self, requests):
        raise NotImplementedError

    def forward(self, seqs, rows, pad_left: bool = True, prefill: bool = False):
        """Run ``rows`` (row i belongs to ``seqs[i]``); feed the tokens to the live sequences."""
        start = self.now()
        tokens = self.runner.step(rows, pad_left)
        now = self.now()
        live = [(s, r) for s, r in zip(seqs, rows) if not s.done]
        # each row's real tokens: padding before the sequence's start does not count
        pairs = [(0 if prefill else s.context, len(r.tokens) - max(0, s.start - r.first_col))
                 for s, r in live]
        self.steps.append(Step.of(
            start, now, pairs, decode_tokens=0 if prefill else sum(n for _, n in pairs),
            rows=len(rows), slots=len(rows) * max(len(r.tokens) for r in rows),
            active=[s.req.id for s, _ in live], held=[s.req.id for s in seqs if s.done]))
        for s, r, token in zip(seqs, rows, tokens):
            if s.done:
                continue                         # a finished row computed padding
            s.next_col, s.last = r.first_col + len(r.tokens), token
            self.records[s.req.id].emit(token, now)
            reason = self.is_done(s.req, token)
            if reason:
                s.done = True
                self.finish(s.req, reason)
        # memory: tokens the live rows hold, against the full cache rows reserved for them
        step = self.steps[-1]
        step.kv_used = sum(s.context for s in seqs if not s.done)
        step.kv_reserved = len(seqs) * self.runner.cache.max_len   # finished static rows too
