"""Static batching: collect ``max_batch`` requests, pad them to one length, run until *every*
one of them has finished. A request that finishes early keeps its row: the batch goes on
computing a token for it at every step, and nothing new may join until the batch is done.
"""
from __future__ import annotations

from collections import deque

from course_lib.engines.padded import PaddedEngine, Seq
from course_lib.engines.runner import Row


class StaticEngine(PaddedEngine):
    name = "static"

    def schedule(self, requests):
        queue = deque(requests)
        while queue:
            batch = [queue.popleft() for _ in range(min(self.max_batch, len(queue)))]
            self.wait_until(batch[-1].arrival_s)        # the batch starts once all of it is here
            width = max(len(r.prompt_tokens) for r in batch)
            seqs = [Seq(r, slot=i, start=width - len(r.prompt_tokens)) for i, r in enumerate(batch)]
            # prefill: every prompt, left-padded so that all of them end in the same column
            self.forward(seqs, [Row(s.slot, s.req.prompt_tokens, s.start, s.start) for s in seqs],
                         prefill=True)
            # decode: every row, finished or not, until the last one is done
            while not all(s.done for s in seqs):
                self.forward(seqs, [Row(s.slot, [s.last], s.next_col, s.start) for s in seqs])
