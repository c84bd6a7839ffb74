"""Decode steps as CUDA graphs (chapter 09).

A decode step of a 1B model is a few hundred small kernels (16 layers x norms, matmuls, RoPE,
the cache write, attention, the MLP). Launched one by one from Python, each costs the host a few
microseconds, and at small batch the GPU finishes them faster than Python can launch them: the
step is *launch-bound*. A CUDA graph records the whole step once and replays it with one launch.

A graph replays fixed kernels on fixed memory, so:
* the batch size is fixed: one graph per *bucket* (1, 2, 4, ... 32, then every 32 up to the
  largest batch); a step of ``B`` sequences runs the smallest bucket ``>= B``, and the extra rows
  are padding that writes to the cache's pad block and is never read;
* the inputs live in one fixed buffer on the device (tokens, positions, cache slots, lengths,
  block tables), refilled from the host with *one* copy per step;
* the next token is chosen inside the graph (``course_lib.sampling``): ``B`` integers come back,
  not ``B x vocab`` logits.
Attention reads the cache through the block tables with the course's Triton kernel, whose loop
runs to each sequence's length read from memory, so the same graph serves any context length.

Without CUDA (or with ``graphs=False``) the same buffers run eagerly: what the tests check on the
CPU.
"""
from __future__ import annotations

import numpy as np
import torch

from .attention import DecodeAttention
from .sampling import sample


def batch_buckets(max_batch: int) -> list:
    """The batch sizes graphs are captured for: 1, 2, 4, ... 32, then every 32 up to max_batch."""
    sizes = [b for b in (1, 2, 4, 8, 16, 32) if b < max_batch]
    sizes += list(range(32, max_batch, 32))
    return sorted(set(sizes + [max_batch]))


class DecodeGraphs:
    """Runs decode steps of ``model`` over ``cache`` for up to ``max_batch`` sequences of up to
    ``max_blocks`` blocks each: captured as CUDA graphs on CUDA, eager elsewhere."""

    def __init__(self, model, cache, max_batch: int, max_blocks: int, temperature: float = 0.0,
                 graphs: bool | None = None):
        self.model, self.cache, self.temperature = model, cache, temperature
        self.device = model.device
        self.graphs_on = self.device.type == "cuda" if graphs is None else graphs
        self.buckets, self.max_blocks = batch_buckets(max_batch), max_blocks
        B = self.buckets[-1]
        # one int64 buffer: tokens | positions | slots | lengths | block tables (B x max_blocks)
        n = 4 * B + B * max_blocks
        self.inputs = torch.zeros(n, dtype=torch.long, device=self.device)
        self.host = torch.zeros(n, dtype=torch.long, pin_memory=self.device.type == "cuda")
        self.np = self.host.numpy()
        self.tokens, self.positions, self.slots, self.lengths = self.inputs[:4 * B].view(4, B)
        self.tables = self.inputs[4 * B:].view(B, max_blocks)
        self.out, self.graphs = {}, {}
        self._row_table, self._row_written = [None] * B, [0] * B   # which table each row holds
        self.out_host = torch.zeros(B, dtype=torch.long, pin_memory=self.device.type == "cuda")
        self._fill([])
        self.inputs.copy_(self.host)
        if self.graphs_on:
            self.capture()

    def _forward(self, nb: int):
        attn = DecodeAttention(self.cache, self.slots[:nb], self.tables[:nb], self.lengths[:nb])
        hidden = self.model.hidden_states(self.tokens[:nb], self.positions[:nb], attn)
        # greedy needs no float32 copy of the logits: the argmax is the same
        return sample(self.model.logits(hidden, float32=self.temperature > 0), self.temperature)

    @torch.inference_mode()
    def capture(self):
        """Record one graph per bucket, the largest first, all in one memory pool."""
        pool = None
        for nb in reversed(self.buckets):
            self._forward(nb)                      # compiles the kernels, outside the graph
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.out[nb] = self._forward(nb)
            pool = g.pool()
            self.graphs[nb] = g
        torch.cuda.synchronize()

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _fill(self, rows):
        """Write a step's inputs into the host buffer; the rows past ``len(rows)`` up to the
        largest bucket are padding: token 0 at position 0, written to the pad block."""
        B, bs = self.buckets[-1], self.cache.block_size
        h, n = self.np, len(rows)
        tokens, positions, slots, lengths = h[:4 * B].reshape(4, B)
        tables = h[4 * B:].reshape(B, self.max_blocks)
        if n:
            tokens[:n] = np.fromiter((row[0] for row in rows), np.int64, n)
            positions[:n] = np.fromiter((row[1] for row in rows), np.int64, n)
        # A block table only grows while its sequence runs, and a sequence keeps its row from
        # step to step unless the batch changes: write only the blocks a row does not hold yet
        # (rewriting every table, a Python list each, cost more than 0.5 ms a step at batch 512)
        held, written = self._row_table, self._row_written
        for i, (_, _, table) in enumerate(rows):
            have = written[i] if held[i] is table else 0
            if have < len(table):
                tables[i, have:len(table)] = table[have:]
                held[i], written[i] = table, len(table)
        slots[:n] = tables[np.arange(n), positions[:n] // bs] * bs + positions[:n] % bs
        lengths[:n] = positions[:n] + 1
        tokens[n:], positions[n:], lengths[n:] = 0, 0, 1
        slots[n:] = self.cache.pad_block * bs
        tables[n:, 0] = self.cache.pad_block
        held[n:] = [None] * (B - n)                 # padding rows hold the pad block now

    @torch.inference_mode()
    def step(self, rows) -> list:
        """One decode step. ``rows``: ``(last token, its position, block table)`` per sequence,
        the table already holding the position's block. Returns the next token of each."""
        n = len(rows)
        if not 0 < n <= self.buckets[-1]:
            raise ValueError(f"a decode step takes 1 to {self.buckets[-1]} sequences, got {n}")
        if max(len(t) for _, _, t in rows) > self.max_blocks:
            raise ValueError(f"a block table is longer than the {self.max_blocks} blocks captured")
        nb = self.bucket(n)
        self._fill(rows)
        self.inputs.copy_(self.host, non_blocking=True)
        if nb in self.graphs:
            self.graphs[nb].replay()
            out = self.out[nb]
        else:
            out = self._forward(nb)
        self.out_host[:nb].copy_(out, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        return self.out_host[:n].tolist()
