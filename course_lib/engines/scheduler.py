"""The paged engine's scheduler (chapters 05, 07): which sequences feed how many tokens next.
Decodes first; then prompt chunks while the step has tokens left (``max_num_batched_tokens``),
prompts half fed before newcomers, whom the *policies* may hold back. When a decode needs a block
and none is free, the newest sequence is *preempted*: its blocks are freed and it goes back to
the front of the queue, to be recomputed later, never lost.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass


def chunk_sizes(pending: list, budget) -> list:
    """How a step's token budget is split among prompts waiting to be prefilled, in order: each
    takes what it still needs, until the budget is spent (later prompts get 0 this step)."""
    sizes = []
    for n in pending:
        take = int(min(n, budget))
        sizes.append(take)
        budget -= take
    return sizes


@dataclass
class StepPlan:
    """One step: ``seqs[i]`` feeds ``sizes[i]`` tokens, decodes first; ``sampled``: those fed to
    their last token; ``decode_only``: one token each, all sampled (a CUDA graph can replay it)."""
    seqs: list
    sizes: list
    decode_only: bool
    sampled: list

    def __len__(self) -> int:
        return len(self.seqs)

    def __iter__(self):
        return zip(self.seqs, self.sizes)


class Scheduler:
    """A waiting queue and the running sequences, over a ``BlockManager``."""

    def __init__(self, blocks, max_batch: int, max_num_batched_tokens: int | None = None,
                 policies=()):
        self.blocks, self.max_batch = blocks, max_batch
        self.max_num_batched_tokens, self.policies = max_num_batched_tokens, list(policies)
        self.waiting, self.running, self.preemptions = deque(), [], 0

    def schedule(self) -> StepPlan:
        """The next step: decodes first, then prompt chunks, under the token budget."""
        blocks, running, waiting = self.blocks, self.running, self.waiting
        budget = self.max_num_batched_tokens or float("inf")      # tokens left
        decodes = [s for s in running if s.pending == 1][:self.max_num_batched_tokens]  # 1. decodes
        seqs = []
        if blocks.grow_each([s.req.id for s in decodes]):    # the usual case: room for all
            seqs, decodes = decodes, []
        for seq in decodes:                   # else one by one, preempting the newest for room
            if len(seqs) >= budget:
                break
            while not blocks.can_grow(seq.req.id, 1):
                victim = running[-1]                                     # the newest goes back
                self.preempt(victim)
                if victim in seqs:            # taken already (seq itself went back before)
                    seqs.remove(victim)
                if victim is seq:
                    break
            if seq in running:
                blocks.grow(seq.req.id, 1)
                seqs.append(seq)
        sizes, budget = [1] * len(seqs), budget - len(seqs)
        chunks = [s for s in running if s.pending > 1]                     # 2. unfinished prompts
        while waiting and len(running) < self.max_batch:                   #    and newcomers
            if waiting[0].tokens[-1] is None:   # preempted while its last token was still on the
                break                            # device: it comes back once the host has it
            if not all(p.admit(waiting[0], self) for p in self.policies):
                break
            running.append(waiting.popleft())
            chunks.append(running[-1])
        decode_only = True
        for seq, n in zip(chunks, chunk_sizes([s.pending for s in chunks], budget)):
            while n > 0 and not blocks.can_grow(seq.req.id, n):            # take what fits
                n //= 2
            if n > 0:
                decode_only = decode_only and seq.pending == 1
                blocks.grow(seq.req.id, n)
                seqs.append(seq)
                sizes.append(n)
        # newcomers that got nothing this step wait in the queue, in order (running sequences
        # with nothing cached are this step's newcomers; sets of ids, not a scan per newcomer)
        if any(s.cached == 0 for s in chunks):
            taken = {id(s) for s in seqs}
            waiting.extendleft(reversed([s for s in chunks if not s.cached and id(s) not in taken]))
            running[:] = [s for s in running if s.cached or id(s) in taken]
        sampled = list(range(len(seqs))) if decode_only else [
            i for i, (s, n) in enumerate(zip(seqs, sizes)) if s.cached + n == len(s.tokens)]
        return StepPlan(seqs, sizes, decode_only, sampled)

    def preempt(self, seq):
        self.blocks.release(seq.req.id)
        seq.cached = 0
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def shed(self) -> list:
        """Waiting sequences a policy refuses now, out of the queue: ``[(seq, why)]``."""
        refused = [r for p in self.policies if hasattr(p, "shed") for r in p.shed(self)]
        for seq, _ in refused:
            self.waiting.remove(seq)
        return refused

    def launched(self, plan) -> list:
        """The step is on its way: each sampled sequence holds a placeholder (None) for its next
        token until the host reads it (returns their places). One at its last token leaves now:
        its blocks serve the next step, which the device runs after this one."""
        for s, n in plan:
            s.cached += n
        places, seqs = [], plan.seqs
        for j, i in enumerate(plan.sampled):
            seq, tokens = seqs[i], seqs[i].tokens
            places.append(len(tokens))
            tokens.append(None)
            seq.src = j
            if len(tokens) - len(seq.req.prompt_tokens) >= seq.req.max_new_tokens:   # its last
                self.blocks.release(seq.req.id)
                self.running.remove(seq)
        return places

    def postprocess(self, plan, places: list, tokens: list, on_token) -> list:
        """The sampled tokens reach the host: each goes to its place and to ``on_token(seq,
        token)``, which says why the sequence stops (or None); returns those retired, ``[(seq,
        reason)]``. With overlap an EOS is learnt a step late: the token after it is ignored."""
        done, seqs = [], plan.seqs
        for i, place, token in zip(plan.sampled, places, tokens):
            seq = seqs[i]
            seq.tokens[place] = token
            if seq.finished:
                continue
            reason = on_token(seq, token)
            if reason:
                seq.finished = True
                self.blocks.release(seq.req.id)
                if seq in self.running:
                    self.running.remove(seq)
                elif seq in self.waiting:
                    self.waiting.remove(seq)
                done.append((seq, reason))
        return done
