"""Decode steps as CUDA graphs (chapter 09). At small batch the GPU runs a decode step's few
hundred kernels faster than Python launches them: a graph records the step once and replays it
with one launch, on fixed memory. So one graph per batch *bucket* (padding rows write to the
cache's pad block; the decode kernel reads the lengths from memory, so any context fits), the
inputs in one device buffer refilled by one copy a step, and the next token chosen inside the
graph into ``last``, where the next step reads it (``src``) before the host has seen it. Without
CUDA (or with ``graphs=False``) the same buffers run eagerly.
"""
from __future__ import annotations

import numpy as np
import torch

from course_lib.kernels.paged_decode import DecodeAttention
from course_lib.model.sampling import sample


def batch_buckets(max_batch: int) -> list:
    """The batch sizes graphs are captured for: 1, 2, 4, ... 32, then every 32 up to max_batch."""
    small = [b for b in (1, 2, 4, 8, 16) if b < max_batch]
    return small + list(range(32, max_batch, 32)) + [max_batch]


class DecodeGraphs:
    """Decode steps for up to ``max_batch`` sequences of up to ``max_blocks`` blocks.
    ``forward(graphs, nb) -> tokens`` replaces a step's device work (e.g. to time the host)."""

    def __init__(self, model, cache, max_batch: int, max_blocks: int, temperature: float = 0.0,
                 graphs: bool | None = None, last=None, forward=None):
        self.model, self.cache, self.temperature = model, cache, temperature
        self.work = self._forward if forward is None else (lambda nb: forward(self, nb))
        self.device = model.device
        self.graphs_on = self.device.type == "cuda" if graphs is None else graphs
        self.buckets, self.max_blocks = batch_buckets(max_batch), max_blocks
        B = self.buckets[-1]
        # the tokens of the last step, on the device (the engine's, if it shares one)
        self.last = torch.zeros(B, dtype=torch.long, device=self.device) if last is None else last
        # one int64 buffer: tokens | positions | slots | lengths | src | block tables
        n = 5 * B + B * max_blocks
        self.inputs = torch.zeros(n, dtype=torch.long, device=self.device)
        self.tokens, self.positions, self.slots, self.lengths, self.src = \
            self.inputs[:5 * B].view(5, B)
        self.tables = self.inputs[5 * B:].view(B, max_blocks)
        # two host buffers, filled in turns: the host fills one while the GPU has yet to copy the
        # other. Each remembers the block table each of its rows holds, to write only changes
        cuda = self.device.type == "cuda"
        self._hosts = [torch.zeros(n, dtype=torch.long, pin_memory=cuda) for _ in range(2)]
        self._held = [([None] * B, [0] * B) for _ in range(2)]
        self._copied = [None, None]           # an event after each buffer's last copy
        self._turn = 0
        self.out, self.graphs = {}, {}
        self.fill([])
        self.inputs.copy_(self._hosts[0])
        if self.graphs_on:
            self.capture()
        elif self.device.type == "cuda":
            self.warm()

    @property
    def np(self):
        """The host buffer the next step is filled into, as a NumPy array."""
        return self._hosts[self._turn].numpy()

    def rows(self, tokens, a: int, b: int):
        """The final hidden states of batch rows ``a .. b - 1``."""
        attn = DecodeAttention(self.cache, self.slots[a:b], self.tables[a:b], self.lengths[a:b])
        return self.model.hidden_states(tokens[a:b], self.positions[a:b], attn)

    def hidden(self, tokens, nb: int):
        """The first ``nb`` rows' hidden states (a subclass may compute them otherwise)."""
        return self.rows(tokens, 0, nb)

    def _forward(self, nb: int):
        src = self.src[:nb]          # a token the host does not know yet: read it from ``last``
        tokens = torch.where(src >= 0, self.last[src.clamp(min=0)], self.tokens[:nb])
        hidden = self.hidden(tokens, nb)
        # greedy needs no float32 copy of the logits: the argmax is the same
        out = sample(self.model.logits(hidden, float32=self.temperature > 0), self.temperature)
        self.last[:nb].copy_(out)
        return out

    @torch.inference_mode()
    def warm(self):
        """Run every bucket once, eagerly: Triton compiles now, not in a timed step or a capture."""
        for nb in reversed(self.buckets):
            self.work(nb)
        torch.cuda.synchronize()

    @torch.inference_mode()
    def capture(self):
        """Record one graph per bucket, the largest first, all in one memory pool."""
        self.warm()                                # compiles the kernels, outside the graphs
        pool = None
        for nb in reversed(self.buckets):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.out[nb] = self.work(nb)
            pool = g.pool()
            self.graphs[nb] = g
        torch.cuda.synchronize()

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def fill(self, rows):
        """Write a step's inputs into the host buffer, the rows past ``len(rows)`` as padding.
        ``rows``: ``(token, position, table, src)``, ``src`` >= 0 for a token to read from
        ``last`` (then ``token`` is ignored), -1 otherwise."""
        B, bs = self.buckets[-1], self.cache.block_size
        h, n = self.np, len(rows)
        tokens, positions, slots, lengths, src = h[:5 * B].reshape(5, B)
        tables = h[5 * B:].reshape(B, self.max_blocks)
        for column, i in ((tokens, 0), (positions, 1), (src, 3)):
            column[:n] = np.fromiter((row[i] for row in rows), np.int64, n)
        # a table only grows, and a sequence keeps its row: write only the blocks a row lacks
        held, written = self._held[self._turn]
        for i, (_, _, table, _) in enumerate(rows):
            have = written[i] if held[i] is table else 0
            if have < len(table):
                tables[i, have:len(table)] = table[have:]
                held[i], written[i] = table, len(table)
        slots[:n] = tables[np.arange(n), positions[:n] // bs] * bs + positions[:n] % bs
        lengths[:n] = positions[:n] + 1
        tokens[n:], positions[n:], lengths[n:], src[n:] = 0, 0, 1, -1
        slots[n:] = self.cache.pad_block * bs
        tables[n:, 0] = self.cache.pad_block
        held[n:] = [None] * (B - n)                 # padding rows hold the pad block now

    @torch.inference_mode()
    def launch(self, rows) -> int:
        """Queue one decode step and return its bucket at once. ``rows`` as in ``fill``, each table
        holding its position's block; the next tokens land in ``last[:len(rows)]``."""
        n = len(rows)
        if not 0 < n <= self.buckets[-1]:
            raise ValueError(f"a decode step takes 1 to {self.buckets[-1]} sequences, got {n}")
        if max(len(row[2]) for row in rows) > self.max_blocks:
            raise ValueError(f"a block table is longer than the {self.max_blocks} blocks captured")
        nb = self.bucket(n)
        turn = self._turn
        if self._copied[turn] is not None:    # the GPU has copied this buffer's last contents
            self._copied[turn].synchronize()
        self.fill(rows)
        self.inputs.copy_(self._hosts[turn], non_blocking=True)
        if self.device.type == "cuda":
            self._copied[turn] = torch.cuda.Event()
            self._copied[turn].record()
        self._turn ^= 1
        if nb in self.graphs:
            self.graphs[nb].replay()
        else:
            self.work(nb)
        return nb

    def step(self, rows) -> list:
        """One decode step, waited for. ``rows``: ``(last token, its position, block table)``
        per sequence. Returns the next token of each."""
        self.launch([(token, pos, table, -1) for token, pos, table in rows])
        return self.last[:len(rows)].tolist()
