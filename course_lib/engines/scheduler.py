"""The paged engine's scheduler (chapters 05, 07): which sequences feed how many tokens next.
Decodes first, then prompt chunks while the step has tokens left (``max_num_batched_tokens``);
the *policies* may hold newcomers back. When a decode needs a block and none is free, a running
sequence is *preempted*: its blocks are freed and it goes back to the front of the queue, to be
recomputed, never lost."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass


def chunk_sizes(pending: list, budget) -> list:
    """How a step's token budget is split among prompts waiting to be prefilled, in order: each
    takes what it still needs, until the budget is spent (later prompts get 0 this step)."""
    sizes = []
    for n in pending:
        sizes.append(take := int(min(n, budget)))
        budget -= take
    return sizes


@dataclass
class StepPlan:
    """One step: ``seqs[i]`` feeds ``sizes[i]`` tokens, decodes first (a *decode*: one token to
    feed, an answer's or a prompt's last); ``sampled``: those fed to their last token;
    ``decode_only``: one token each, all sampled (a CUDA graph can replay it)."""
    seqs: list
    sizes: list
    decode_only: bool
    sampled: list

    def __len__(self) -> int:
        return len(self.seqs)

    def __iter__(self):
        return zip(self.seqs, self.sizes)


def budget_step(running: list, budget) -> list:
    """The token-budget step, ``[(seq, tokens)]``: one token for each decode (``pending == 1``),
    then prompt chunks in arrival order with what is left of ``budget``; no 0-token entries."""
    order = [s for s in running if s.pending == 1] + [s for s in running if s.pending > 1]
    return [(s, n) for s, n in zip(order, chunk_sizes([s.pending for s in order], budget)) if n]


class Scheduler:
    """Waiting and running sequences over a ``BlockManager``; rules: ``budget_step``, ``victim``."""
    budget_step = staticmethod(budget_step)

    def __init__(self, blocks, max_batch: int, max_num_batched_tokens=None, policies=()):
        self.blocks, self.max_batch = blocks, max_batch
        self.max_num_batched_tokens, self.policies = max_num_batched_tokens, list(policies)
        self.waiting, self.running, self.preemptions = deque(), [], 0

    def victim(self):
        """Whom to preempt when a block is missing: the newest (first come, first served)."""
        return self.running[-1]

    def schedule(self) -> StepPlan:
        """The next step: a token for every decode (preempting if blocks run short), newcomers as
        the policies allow, then prompt chunks that fit in what is left of the budget and blocks."""
        blocks, running, waiting = self.blocks, self.running, self.waiting
        budget = self.max_num_batched_tokens or float("inf")      # tokens per step
        decodes = [s for s, _ in self.budget_step(running, budget) if s.pending == 1]
        if blocks.grow_each([s.req.id for s in decodes]):         # usually
            grown = set(decodes)
        else:                                                     # one by one, preempting
            for seq in decodes:
                while seq in running and not blocks.can_grow(seq.req.id, 1):
                    self.preempt(self.victim())                   # perhaps seq itself
                if seq in running:
                    blocks.grow(seq.req.id, 1)
            grown = set(decodes).intersection(running)
        # newcomers, as the policies allow (one whose last token is still on the device waits)
        while (waiting and len(running) < self.max_batch and waiting[0].tokens[-1] is not None
               and all(p.admit(waiting[0], self) for p in self.policies)):
            running.append(seq := waiting.popleft())
            if hasattr(blocks, "match"):          # a prefix cache: its prefix's blocks, if any
                seq.cached = blocks.match(seq.req.id, seq.tokens)
        seqs, sizes, decode_only = [], [], True
        for seq, n in self.budget_step(running, budget):
            if seq not in grown:      # a chunk: halved until its blocks fit (0: not this step)
                while n > 0 and not blocks.can_grow(seq.req.id, n):
                    n //= 2
                if n == 0:
                    continue
                decode_only = decode_only and seq.pending == 1
                blocks.grow(seq.req.id, n)
            seqs.append(seq)
            sizes.append(n)
        # newcomers that got nothing wait in the queue, in order (those with nothing cached)
        if any(not s.cached for s in running):
            taken = set(seqs)
            waiting.extendleft(reversed([s for s in running if not (s.cached or s in taken)]))
            running[:] = [s for s in running if s.cached or s in taken]
        sampled = list(range(len(seqs))) if decode_only else [
            i for i, (s, n) in enumerate(zip(seqs, sizes)) if s.cached + n == len(s.tokens)]
        return StepPlan(seqs, sizes, decode_only, sampled)

    def preempt(self, seq):
        self.blocks.release(seq.req.id)
        seq.cached, self.preemptions = 0, self.preemptions + 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def shed(self) -> list:
        """Waiting sequences a policy refuses now, out of the queue: ``[(seq, why)]``."""
        refused = [r for p in self.policies if hasattr(p, "shed") for r in p.shed(self)]
        for seq, _ in refused:
            self.waiting.remove(seq)
        return refused

    def launched(self, plan) -> list:
        """Bookkeeping before the step's tokens are known: advance ``cached``, tell a prefix cache
        of full blocks, hold a None where each sampled token goes (returns where). One at
        ``max_new_tokens`` retires now: the next plan, made before these tokens arrive, skips it."""
        for s, n in plan:
            s.cached += n
            if hasattr(self.blocks, "written"):
                self.blocks.written(s.req.id, s.tokens, s.cached)
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
                for queue in (self.running, self.waiting):
                    if seq in queue:
                        queue.remove(seq)
                done.append((seq, reason))
        return done
