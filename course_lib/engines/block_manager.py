"""The paged KV-cache's bookkeeping (chapter 07): blocks of ``block_size`` tokens; each sequence
owns a *block table*, its blocks in order (token ``p`` lives in block ``table[p // block_size]``
at offset ``p % block_size``), allocated as it grows and freed when it finishes or is preempted.
The keys and values live in ``course_lib.model.kv_cache.PagedKVCache``."""
from __future__ import annotations


class OutOfBlocks(RuntimeError):
    """No free block is left: the scheduler must wait, or preempt a running sequence."""


class BlockAllocator:
    """Fixed-size blocks handed out from a free list, with a reference count per block (a block
    shared by two sequences, e.g. a common prompt prefix, is freed when both let go of it)."""

    def __init__(self, n_blocks: int):
        if n_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {n_blocks}")
        self.n_blocks = n_blocks
        self.free_list = list(range(n_blocks - 1, -1, -1))     # pop() hands out block 0 first
        self.refs = [0] * n_blocks

    @property
    def n_free(self) -> int:
        return len(self.free_list)

    def allocate(self) -> int:
        if not self.free_list:
            raise OutOfBlocks(f"all {self.n_blocks} KV-cache blocks are in use")
        block = self.free_list.pop()
        self.refs[block] = 1
        return block

    def share(self, block: int) -> int:
        if self.refs[block] < 1:
            raise ValueError(f"block {block} is free: nothing to share")
        self.refs[block] += 1
        return block

    def free(self, block: int):
        if self.refs[block] < 1:
            raise ValueError(f"block {block} is already free")
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.free_list.append(block)


class BlockManager:
    """The allocator, and by sequence id its block table (``tables``) and tokens (``lengths``)."""

    def __init__(self, n_blocks: int, block_size: int):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1 token, got {block_size}")
        self.block_size, self.allocator = block_size, BlockAllocator(n_blocks)
        self.tables: dict = {}
        self.lengths: dict = {}

    @property
    def n_blocks(self) -> int:
        return self.allocator.n_blocks

    @property
    def n_free(self) -> int:
        return self.allocator.n_free

    def reset(self):
        self.allocator = BlockAllocator(self.allocator.n_blocks)
        self.tables.clear()
        self.lengths.clear()

    def blocks_needed(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def can_grow(self, seq_id, n_new: int) -> bool:
        have = len(self.tables.get(seq_id, ()))
        return self.blocks_needed(self.lengths.get(seq_id, 0) + n_new) - have <= self.n_free

    def grow(self, seq_id, n_new: int):
        """Make room for ``n_new`` more tokens of ``seq_id`` (raises ``OutOfBlocks``, leaving the
        sequence as it was, when there are not enough free blocks)."""
        if not self.can_grow(seq_id, n_new):
            raise OutOfBlocks(f"sequence {seq_id!r} needs more blocks than the "
                              f"{self.n_free} free ones")
        table = self.tables.setdefault(seq_id, [])
        n = self.lengths.get(seq_id, 0) + n_new
        while len(table) < self.blocks_needed(n):
            table.append(self.allocator.allocate())
        self.lengths[seq_id] = n

    def grow_each(self, seq_ids) -> bool:
        """One more token for each of ``seq_ids`` (sequences already here: a decode step), all or
        nothing: ``False``, and nothing changed, when the free blocks do not suffice. Only a
        sequence whose blocks are full needs a new one, so one count checks the whole batch."""
        tables, lengths, bs = self.tables, self.lengths, self.block_size
        full = [s for s in seq_ids if lengths[s] == len(tables[s]) * bs]
        if len(full) > self.n_free:
            return False
        for s in full:
            tables[s].append(self.allocator.allocate())
        for s in seq_ids:
            lengths[s] += 1
        return True

    def grow_side_by_side(self, lengths: dict, chunk: int = 1):
        """Grow sequences ``{seq_id: tokens}`` in turns of ``chunk`` tokens, as a batch that decodes
        together does, so that their blocks interleave in memory (benchmarks and tests)."""
        done = dict.fromkeys(lengths, 0)
        while done != lengths:
            for sid, n in lengths.items():
                take = min(chunk, n - done[sid])
                if take:
                    self.grow(sid, take)
                    done[sid] += take

    def release(self, seq_id):
        """Let go of every block of a sequence (finished, or preempted)."""
        for block in self.tables.pop(seq_id, ()):
            self.allocator.free(block)
        self.lengths.pop(seq_id, None)
