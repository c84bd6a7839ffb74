"""Continuous batching: schedule at the level of iterations, not requests. Before every decode
step, finished sequences leave and waiting requests take their slots (their prompts are
prefilled first); then one decode step runs for every sequence in the batch. No sequence waits
for another, and each slot's cache row holds its own sequence from column 0.
"""
from __future__ import annotations

from collections import deque

from course_lib.engines.padded import PaddedEngine, Seq
from course_lib.engines.runner import Row


def admit(queue: deque, free: list, now: float) -> list:
    """The admission rule: waiting requests that have arrived, oldest first, each taking the
    lowest free slot, while slots are free. Returns ``(request, slot)`` pairs; updates both."""
    admitted = []
    while queue and free and queue[0].arrival_s <= now:
        free.sort()
        admitted.append((queue.popleft(), free.pop(0)))
    return admitted


class ContinuousEngine(PaddedEngine):
    name = "continuous"

    def schedule(self, requests):
        queue, running, free = deque(requests), [], list(range(self.max_batch))
        while queue or running:
            # 1. admit: every request that has arrived, while there are free slots
            new = [Seq(req, slot, start=0) for req, slot in admit(queue, free, self.now())]
            if new:   # prefill the newcomers together (padded on the right, each from column 0)
                self.forward(new, [Row(s.slot, s.req.prompt_tokens, 0, 0) for s in new],
                             pad_left=False, prefill=True)
                running += new
            # 2. one decode step for every running sequence (in slot order: a full batch then
            #    reads its cache rows as one block instead of gathering them)
            live = sorted((s for s in running if not s.done), key=lambda s: s.slot)
            if live:
                self.forward(live, [Row(s.slot, [s.last], s.next_col, 0) for s in live])
            # 3. finished sequences leave; their slots are free at the next iteration
            free += [s.slot for s in running if s.done]
            running = [s for s in running if not s.done]
            if not running and queue:
                self.wait_until(queue[0].arrival_s)     # idle until the next request arrives
