"""Attention variants. The model calls ``attn(layer, q, k, v)`` once per layer; the attention
object stores the new keys and values in its KV-cache and attends over everything visible:
a padded batch over a contiguous cache, or packed tokens over a paged one (gathered, read in
place with FlexAttention, or copied out for it). Decode's kernel: ``kernels.paged_decode``.
"""
from __future__ import annotations

import warnings
from itertools import accumulate

import numpy as np
import torch
import torch.nn.functional as F

from course_lib.model.kv_cache import to_device


def padded_visibility(start, write_at, n_cols):
    """Which cache columns each new token may attend to: a boolean ``(B, T, n_cols)``. A real
    token at column ``c`` of row ``r`` sees columns ``start[r] .. c``; a padding token only itself,
    so that no softmax row is empty (an empty row gives NaN)."""
    cols = torch.arange(n_cols, device=write_at.device)                # (S,)
    at = write_at[..., None]                                           # (B, T, 1)
    real = (cols >= start[:, None, None]) & (cols <= at)
    return real | (cols == at)


class PaddedAttention:
    """Attention over a padded batch: the ``ContiguousKVCache`` rows (``slots``) of the batch, the
    first real column of each (``start``, ``(B,)``), the cache column of each new token
    (``write_at``, ``(B, T)``); ``n_cols``, given, spares the device sync of ``write_at.max()``."""

    def __init__(self, cache, slots, start, write_at, n_cols: int | None = None):
        self.cache, self.write_at = cache, write_at
        slots = list(slots)
        self.slot_index = torch.tensor(slots, device=write_at.device)[:, None]
        # consecutive slots are a view of the cache; any other set of rows must be gathered
        rows = range(slots[0], slots[0] + len(slots))
        self.rows = slice(rows.start, rows.stop) if slots == list(rows) else self.slot_index[:, 0]
        self.n_cols = int(write_at.max()) + 1 if n_cols is None else n_cols
        self.visible = padded_visibility(start, write_at, self.n_cols)[:, None]   # (B, 1, T, S)
        self.positions = (write_at - start[:, None]).clamp(min=0)         # RoPE positions

    def __call__(self, layer, q, k, v):     # q: (B, T, H, d); k, v: (B, T, Hkv, d)
        K, V = self.cache.k[layer], self.cache.v[layer]                   # (slots, Hkv, L, d)
        K[self.slot_index, :, self.write_at], V[self.slot_index, :, self.write_at] = k, v
        K, V = K[self.rows, :, :self.n_cols], V[self.rows, :, :self.n_cols]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), K, V, attn_mask=self.visible,
                                           enable_gqa=True)                # (B, H, T, d)
        return o.transpose(1, 2)


def cu_seqlens(lengths) -> list:
    """Where each sequence starts in a packed list, then its end: ``[0, l0, l0 + l1, ...]``."""
    return [0, *accumulate(lengths)]


def block_diagonal_causal(q_seq, q_pos, k_seq, k_pos):
    """The ``(N queries, M keys)`` mask of packed attention: same sequence, key not later."""
    return (q_seq[:, None] == k_seq[None, :]) & (k_pos[None, :] <= q_pos[:, None])


def write_cache(cache, layer, slots, k, v):
    """Write the new tokens' keys and values ``(N, Hkv, d)`` at their ``slots`` of one layer."""
    K, V = cache.k[layer], cache.v[layer]                    # (Hkv, blocks * block_size, d)
    K[:, slots], V[:, slots] = k.transpose(0, 1), v.transpose(0, 1)


class PagedAttention:
    """Attention over *packed* tokens of the ``(seq_id, n_cached, n_new)`` ``seqs``, in a paged
    cache with room for them. The reference: each sequence's keys are gathered through its block
    table, and one masked attention runs over them all. ``attend`` alone skips the cache write."""

    def __init__(self, cache, seqs, device="cpu"):
        self.cache = cache
        pos, slots, read, q_seq, k_seq, k_pos = [], [], [], [], [], []
        for i, (sid, cached, new) in enumerate(seqs):
            pos += range(cached, cached + new)
            slots += cache.slots(sid, cached, cached + new)
            read += cache.slots(sid, 0, cached + new)
            q_seq += [i] * new
            k_seq += [i] * (cached + new)
            k_pos += range(cached + new)
        def t(x):
            return torch.tensor(x, device=device)
        self.positions, self.slots, self.read = t(pos), t(slots), t(read)
        self.cu_seqlens = t(cu_seqlens(new for _, _, new in seqs))
        self.mask = block_diagonal_causal(t(q_seq), self.positions, t(k_seq), t(k_pos))

    def __call__(self, layer, q, k, v):     # q: (N, H, d); k, v: (N, Hkv, d)
        write_cache(self.cache, layer, self.slots, k, v)
        return self.attend(layer, q)

    def attend(self, layer, q):
        """The queries' attention over the cache, which already holds their keys."""
        K, V = self.cache.k[layer][:, self.read], self.cache.v[layer][:, self.read]   # a copy
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], K[None], V[None],
                                           attn_mask=self.mask[None, None], enable_gqa=True)
        return o[0].transpose(0, 1)                               # (N, H, d)


def bucket(n: int, smallest: int = 128) -> int:
    """The next power of two from ``smallest`` up: the shapes a compiled kernel is reused for."""
    return max(smallest, 1 << (max(n, 1) - 1).bit_length())


_compiled = {}


def flex_attention(*args, **kwargs):
    """FlexAttention: on CUDA compiled, one kernel per query bucket; on the CPU the reference."""
    from torch.nn.attention.flex_attention import flex_attention as flex
    if args[0].device.type == "cuda":
        if "cuda" not in _compiled:
            import torch._dynamo.config as dynamo
            for name in ("recompile_limit", "cache_size_limit"):   # one kernel per bucket
                if hasattr(dynamo, name):
                    setattr(dynamo, name, max(getattr(dynamo, name), 64))
                    break
            _compiled["cuda"] = torch.compile(flex, dynamic=False)
        return _compiled["cuda"](*args, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return flex(*args, **kwargs)


TILE = 128     # FlexAttention's tile: 128 queries x 128 key slots
# its kernel tiles on CUDA; the block mask's too, so that fewer tiles are shared by sequences
FLEX_OPTIONS: dict = {"BLOCK_M": 64, "BLOCK_N": 64}


def mask_tile(device) -> int:
    """The block mask's tile: the kernel's own on CUDA (``FLEX_OPTIONS``), else 128."""
    m, n = FLEX_OPTIONS.get("BLOCK_M"), FLEX_OPTIONS.get("BLOCK_N")
    return m if torch.device(device).type == "cuda" and m == n else TILE


class FlexPagedAttention(PagedAttention):
    """Packed, paged attention reading the keys and values *in place*, with FlexAttention. Query
    i sees slot j if ``owner[j] == q_seq[i] and slot_pos[j] <= position[i]``; the block mask lists
    only the tiles holding this step's sequences. Queries are padded to a ``bucket``, the keys are
    the whole cache: few shapes to compile."""

    # inference mode, as in ``precompile``: else the mask fails a guard and the kernel recompiles
    @torch.inference_mode()
    def __init__(self, cache, seqs, device="cpu", n_pad: int | None = None):
        from torch.nn.attention.flex_attention import BlockMask
        self.cache, bs = cache, cache.block_size
        layout = cache.packed_layout(seqs)
        self.n = len(layout["positions"])
        on = to_device(np.concatenate(list(layout.values())), device)       # one copy
        self.positions, self.slots, q_seq, blocks, block_seq, block_index = on.split(
            [len(v) for v in layout.values()])
        self.cu_seqlens = to_device(cu_seqlens(new for _, _, new in seqs), device)
        n_slots, n_pad, tile = cache.n_slots, n_pad or bucket(self.n), mask_tile(device)
        # every slot: which sequence of this step owns it, at which position
        owner = torch.full((n_slots // bs, bs), -1, device=device)
        owner[blocks] = block_seq[:, None]
        slot_pos = torch.zeros((n_slots // bs, bs), dtype=torch.long, device=device)
        slot_pos[blocks] = block_index[:, None] * bs + torch.arange(bs, device=device)
        owner, slot_pos = owner.flatten(), slot_pos.flatten()
        q_seq = torch.cat([q_seq, torch.full((n_pad - self.n,), -2, device=device)])
        q_pos = torch.cat([self.positions, self.positions.new_zeros(n_pad - self.n)])

        def visible(b, h, i, j):
            return (owner[j] == q_seq[i]) & (slot_pos[j] <= q_pos[i])

        # the block mask: query tile -> the key tiles holding its sequences' blocks
        q_tiles, kv_tiles = n_pad // tile, -(-n_slots // tile)
        first = torch.arange(q_tiles, device=device)[:, None] * tile
        cu = self.cu_seqlens
        seq_in_tile = ((first < cu[1:]) & (first + tile > cu[:-1])).float()
        tiles_of_seq = torch.zeros(len(seqs), kv_tiles, device=device)           # (seqs, KV tiles)
        one = torch.ones((), device=device)          # a host scalar here would be a blocking copy
        for end in [*range(0, bs, tile), bs - 1]:   # a block may straddle tiles
            tiles_of_seq[block_seq, (blocks * bs + end) // tile] = one
        needed = (seq_in_tile @ tiles_of_seq) > 0                                # (Q, KV tiles)
        # a *full* tile (one sequence's queries, its slots all at earlier positions) needs no mask
        pad = kv_tiles * tile - n_slots
        tile_owner = F.pad(owner, (0, pad), value=-1).view(kv_tiles, tile)
        tile_last = F.pad(slot_pos, (0, pad)).view(kv_tiles, tile).amax(-1)
        q_tile_seq, q_tile_pos = q_seq.view(q_tiles, tile), q_pos.view(q_tiles, tile)
        one_seq = (q_tile_seq.amin(-1) == q_tile_seq.amax(-1))[:, None] & \
            (tile_owner.amin(-1) == tile_owner.amax(-1))[None, :]
        full = one_seq & (q_tile_seq[:, :1] == tile_owner[None, :, 0]) & \
            (tile_last[None, :] <= q_tile_pos.amin(-1)[:, None])
        partial = needed & ~full

        def listed_first(tiles):
            order = torch.sort((~tiles).int(), dim=-1, stable=True).indices
            return tiles.sum(-1, dtype=torch.int32)[None, None], order.int()[None, None]

        self.block_mask = BlockMask.from_kv_blocks(
            *listed_first(partial), *listed_first(full),
            BLOCK_SIZE=tile, mask_mod=visible, seq_lengths=(n_pad, n_slots),
            compute_q_blocks=False)           # those are for the backward pass

    kernel_options = FLEX_OPTIONS   # FlexAttention's own settings on CUDA (the module's dict)
    key_multiples = (1,)            # precompiled keys: ``m * n`` per query bucket ``n``

    @staticmethod
    def padding(n: int, m: int) -> dict:
        """The constructor's arguments for ``n`` query slots (and ``m * n`` keys)."""
        return {"n_pad": n}

    @classmethod
    @torch.inference_mode()          # as the model runs: a change of grad mode would recompile
    def precompile(cls, cache, max_tokens: int, shape, dtype):
        """Compile the kernel for every shape a run's steps may take, before its clock starts."""
        device, capacity = cache.k[0].device, cache.blocks.n_blocks * cache.block_size
        if not cache.can_grow("precompile", 1):
            return
        cache.grow("precompile", 1)
        q = torch.zeros(1, shape.n_heads, shape.head_dim, dtype=dtype, device=device)
        multiples = cls.key_multiples
        if hasattr(cache.blocks, "match"):     # a prefix cache: chunks after long cached prefixes
            multiples = getattr(cls, "prefix_key_multiples", multiples)
        n = TILE
        while n <= bucket(min(max_tokens, capacity)):
            for m in multiples:
                if m * n <= bucket(capacity):          # no step has more keys than the cache
                    attn = cls(cache, [("precompile", 0, 1)], device, **cls.padding(n, m))
                    for layer in range(len(cache.k)):
                        attn.attend(layer, q)
            n *= 2
        cache.release("precompile")

    def keys(self, layer):
        """The keys and values to read: the whole cache, in place."""
        return self.cache.k[layer], self.cache.v[layer]

    def attend(self, layer, q):
        K, V = self.keys(layer)
        n_pad = self.block_mask.shape[-2]
        if len(q) < n_pad:                  # else q came with its padding rows (``q_rows``)
            q = F.pad(q, (0, 0, 0, 0, 0, n_pad - len(q)))
        q = q[:n_pad].transpose(0, 1)[None]                          # (1, H, n_pad, d)
        options = {"kernel_options": dict(self.kernel_options)} \
            if q.is_cuda and self.kernel_options else {}
        o = flex_attention(q, K[None], V[None], block_mask=self.block_mask, enable_gqa=True,
                           **options)
        return o[0, :, :self.n].transpose(0, 1)                   # (N, H, d)


class GatheredFlexAttention(FlexPagedAttention):
    """Packed, paged prefill (chapter 09): *copy* the step's keys and values out of the cache,
    where they are scattered, into one packed list, then FlexAttention over it. Query ``i`` sees
    the keys ``lo[i] .. hi[i]``, both growing with ``i``: the block mask is cheap to make on the
    host and almost every tile is *full*. Padding queries see nothing (``lo > hi``)."""

    tile = TILE               # the block mask's tiles: keys are contiguous, no need for smaller
    kernel_options: dict = {"BLOCK_M": 64, "BLOCK_N": 64}     # on CUDA, as ``FLEX_OPTIONS``
    key_multiples = (1, 2)    # whole prompts, or a chunk after earlier ones: more keys
    # over a prefix cache a few new tokens may follow a long cached prefix: up to 64 times
    prefix_key_multiples = tuple(2 ** i for i in range(7))

    @staticmethod
    def padding(n: int, m: int) -> dict:
        return {"n_pad": n, "m_pad": m * n}

    @torch.inference_mode()        # as FlexPagedAttention
    def __init__(self, cache, seqs, device="cpu", n_pad: int | None = None,
                 m_pad: int | None = None):
        self.cache, bs, T = cache, cache.block_size, self.tile
        layout = cache.packed_layout(seqs)
        total = np.array([c + n for _, c, n in seqs], dtype=np.int64)
        self.n, m = len(layout["positions"]), int(total.sum())
        n_pad, m_pad = n_pad or bucket(self.n, T), m_pad or bucket(max(m, self.n), T)
        # every key of every sequence, in order: its slot in the cache (padding reads slot 0)
        k_start = np.cumsum(total) - total
        k_seq = np.repeat(np.arange(len(seqs)), total)
        k_pos = np.arange(m) - k_start[k_seq]
        first_block = np.flatnonzero(layout["block_index"] == 0)
        read = np.zeros(m_pad, dtype=np.int64)
        read[:m] = layout["blocks"][first_block[k_seq] + k_pos // bs] * bs + k_pos % bs
        # the keys each query sees: lo .. hi (padding: 1 .. 0, none)
        lo, hi = np.ones(n_pad, dtype=np.int64), np.zeros(n_pad, dtype=np.int64)
        lo[:self.n] = k_start[layout["q_seq"]]
        hi[:self.n] = lo[:self.n] + layout["positions"]
        partial, full = self.tiles(lo[:self.n], hi[:self.n], n_pad // T, m_pad // T, T)
        parts = [layout["positions"], layout["write"], read, lo, hi, *partial, *full]
        on = to_device(np.concatenate([x.ravel() for x in parts]), device)          # one copy
        self.positions, self.slots, self.read, lo, hi, *mask = on.split([x.size for x in parts])
        self.cu_seqlens = to_device(cu_seqlens(n for _, _, n in seqs), device)
        mask = [x.int().view(1, 1, *y.shape) for x, y in zip(mask, partial + full)]

        def visible(b, h, i, j):
            return (j >= lo[i]) & (j <= hi[i])

        from torch.nn.attention.flex_attention import BlockMask
        self.block_mask = BlockMask.from_kv_blocks(*mask, BLOCK_SIZE=T, mask_mod=visible,
                                                   seq_lengths=(n_pad, m_pad),
                                                   compute_q_blocks=False)

    @staticmethod
    def tiles(lo, hi, q_tiles: int, kv_tiles: int, T: int = TILE):
        """Per query tile, the key tiles to read masked (*partial*) and whole (*full*), each as
        ``(count per query tile, indices listed first)``. ``lo``, ``hi``: non-decreasing."""
        n = len(lo)
        first = np.arange(q_tiles) * T                          # first query of each tile
        last = np.minimum(first + T, n) - 1                     # its last real query
        real = first < n
        first, last = np.minimum(first, n - 1), np.maximum(last, 0)
        cols = np.arange(kv_tiles)[None, :]
        # a key tile is needed if some query of the tile sees some key of it
        needed = real[:, None] & (cols >= (lo[first] // T)[:, None]) \
            & (cols <= (hi[last] // T)[:, None])
        # full: all the tile's queries are real and each sees every key of the key tile
        whole = (real & (first + T <= n))[:, None]
        full = whole & (cols * T >= lo[last][:, None]) & ((cols + 1) * T - 1 <= hi[first][:, None])
        partial = needed & ~full
        return tuple((t.sum(-1), np.argsort(~t, axis=-1, kind="stable")) for t in (partial, full))

    def keys(self, layer):
        """The step's keys and values, copied out of the cache: each key a row of 8-byte words
        where it can (``index_select`` then moves a few words per key, not each number)."""
        K, V = self.cache.k[layer], self.cache.v[layer]
        if (K.shape[-1] * K.element_size()) % 8:
            return K.index_select(1, self.read), V.index_select(1, self.read)
        return (x.view(torch.int64).index_select(1, self.read).view(x.dtype) for x in (K, V))
