"""The padded model runner: one forward pass, the next token of every row. The engines decide
*what* runs; the runner only executes it (so scheduler tests can swap in a fake model)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from course_lib.model.attention import PaddedAttention
from course_lib.model.kv_cache import ContiguousKVCache


@dataclass
class Row:
    """One row of a padded forward pass."""
    slot: int            # cache row it reads and writes
    tokens: list         # its new tokens (unpadded)
    first_col: int       # cache column of its first new token
    start: int           # its first real cache column (columns before it are padding)


def left_pad(token_lists: list, pad_id: int):
    """Pad rows of tokens on the left to one length: ``(tokens (B, T), start (B,))`` where
    ``start[r]`` is the first real column of row ``r``."""
    T = max(len(t) for t in token_lists)
    tokens = torch.tensor([[pad_id] * (T - len(t)) + list(t) for t in token_lists])
    return tokens, torch.tensor([T - len(t) for t in token_lists])


class PaddedRunner:
    """Runs padded forward passes of a ``Llama`` over a contiguous KV-cache of ``n_slots`` rows."""

    def __init__(self, model, n_slots: int, max_len: int, pad_id: int = 0):
        self.model, self.pad_id = model, pad_id
        self.cache = ContiguousKVCache(model.shape, n_slots, max_len, model.dtype, model.device)

    def step(self, rows: list[Row], pad_left: bool = True) -> list[int]:
        """Each row's greedy next token. Shorter rows are padded on the left (static batching) or
        on the right (a per-slot layout: written past the row's end, never attended to)."""
        dev, T = self.model.device, max(len(r.tokens) for r in rows)
        if pad_left:
            tokens, pads = left_pad([r.tokens for r in rows], self.pad_id)
            write_at = [list(range(r.first_col - p, r.first_col + len(r.tokens)))
                        for r, p in zip(rows, pads.tolist())]
            last = [T - 1] * len(rows)
        else:
            tokens = torch.tensor([list(r.tokens) + [self.pad_id] * (T - len(r.tokens))
                                   for r in rows])
            write_at = [list(range(r.first_col, r.first_col + T)) for r in rows]
            last = [len(r.tokens) - 1 for r in rows]
        lo, hi = min(min(w) for w in write_at), max(max(w) for w in write_at)
        if lo < 0 or hi >= self.cache.max_len:
            raise ValueError("a row's tokens fall outside the KV-cache")
        start = torch.tensor([r.start for r in rows], device=dev)
        attn = PaddedAttention(self.cache, [r.slot for r in rows], start,
                               torch.tensor(write_at, device=dev), n_cols=hi + 1)
        hidden = self.model.hidden_states(tokens.to(dev), attn.positions, attn)
        ends = hidden[torch.arange(len(rows), device=dev), torch.tensor(last, device=dev)]
        return self.model.logits(ends).argmax(-1).tolist()
