"""Dynamic batching: refill at the level of requests. A waiting request takes a finished
sequence's slot, but the batch keeps one padded layout (one column cursor for all rows): a
newcomer is left-padded to the cursor and prefilled on its own while the batch waits, and one
that does not fit the layout waits until the batch drains.
"""
from __future__ import annotations

from collections import deque

from course_lib.engines.padded import PaddedEngine, Seq
from course_lib.engines.runner import Row


def fits(prompt_len: int, max_new_tokens: int, cursor: int, cache_len: int) -> bool:
    """Can a request join a padded batch whose next column is ``cursor``? Its prompt must end
    just before the cursor (so it must not be longer), and its answer must fit after it."""
    return prompt_len <= cursor and cursor + max_new_tokens <= cache_len


class DynamicEngine(PaddedEngine):
    name = "dynamic"

    def cache_len(self, requests) -> int:
        return 2 * super().cache_len(requests)      # room for the shared cursor to run on

    def fits(self, req, cursor: int) -> bool:
        return fits(len(req.prompt_tokens), req.max_new_tokens, cursor, self.runner.cache.max_len)

    def schedule(self, requests):
        queue, running, free, cursor = deque(requests), [], list(range(self.max_batch)), 0
        while queue or running:
            if not running:
                # an empty batch starts afresh, like a static one: everyone that has arrived
                self.wait_until(queue[0].arrival_s)
                new = []
                while queue and len(new) < len(free) and queue[0].arrival_s <= self.now():
                    new.append(queue.popleft())
                width = max(len(r.prompt_tokens) for r in new)
                running = [Seq(r, free.pop(0), start=width - len(r.prompt_tokens)) for r in new]
                self.forward(running, [Row(s.slot, s.req.prompt_tokens, s.start, s.start)
                                       for s in running], prefill=True)
                cursor = width
            else:
                # request-level refill: a waiting request takes a free slot, padded to the cursor
                while (queue and free and queue[0].arrival_s <= self.now()
                       and self.fits(queue[0], cursor)):
                    req = queue.popleft()
                    n = len(req.prompt_tokens)
                    seq = Seq(req, free.pop(0), start=cursor - n)
                    padded = [self.eos] * (cursor - n) + list(req.prompt_tokens)
                    self.forward([seq], [Row(seq.slot, padded, 0, seq.start)], prefill=True)
                    running.append(seq)
            live = [s for s in running if not s.done]
            if live:                  # one decode step, every row at the shared cursor
                self.forward(live, [Row(s.slot, [s.last], cursor, s.start) for s in live])
                cursor += 1
            free += [s.slot for s in running if s.done]
            running = [s for s in running if not s.done]
