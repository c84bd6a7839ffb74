"""Prefix caching (chapter 07): requests that start with the same tokens (a chat service's system
prompt) share the KV blocks of that prefix instead of computing and storing it again.

A full block is known by a hash of its tokens chained with the hash of the block before it, so
two blocks with the same hash hold the same tokens after the same prefix, and so the same keys
and values. The cache holds a reference of its own on every block it knows: a block that no
sequence holds any more keeps its contents, is handed back on a hit, and is evicted (the least
recently freed first) only when a free block is needed. Only a full block whose tokens are all
in the cache is ever shared: never a block still being written.
"""
from __future__ import annotations

from collections import OrderedDict

from course_lib.engines.block_manager import BlockAllocator, BlockManager


def block_key(prev, tokens) -> int:
    """A full block's name: a hash of its tokens with the name of the block before it (``prev``,
    None for a sequence's first block), so that equal names mean equal prefixes."""
    return hash((prev, tuple(tokens)))


class CachingAllocator(BlockAllocator):
    """Blocks with a known content (``key``) stay allocated to the cache; those only the cache
    holds (``idle``) count as free and are evicted, oldest first, when the free list is empty."""

    def __init__(self, n_blocks: int):
        super().__init__(n_blocks)
        self.by_key: dict = {}                 # key -> block
        self.repeats = 0                       # holdings of a block beyond its first holder
        self.content: dict = {}                # block -> (key, its tokens)
        self.idle: OrderedDict = OrderedDict()   # blocks only the cache holds, oldest first

    @property
    def n_free(self) -> int:
        return len(self.free_list) + len(self.idle)

    def allocate(self) -> int:
        if not self.free_list and self.idle:           # memory is needed: evict
            block, _ = self.idle.popitem(last=False)
            del self.by_key[self.content.pop(block)[0]]
            super().free(block)                        # the cache lets go of it
        return super().allocate()

    def free(self, block: int):
        if self.refs[block] - (block in self.content) > 1:     # not its last holder
            self.repeats -= 1
        super().free(block)
        if self.refs[block] == 1 and block in self.content:
            self.idle[block] = None

    def remember(self, block: int, key: int, tokens: tuple):
        """Keep ``block`` (full, written) as the one holding ``tokens`` after the prefix
        ``key`` names; a content already known keeps its first block."""
        if key not in self.by_key and block not in self.content:
            self.by_key[key], self.content[block] = block, (key, tokens)
            self.refs[block] += 1

    def lookup(self, key: int, tokens: tuple) -> int | None:
        """The block holding ``tokens`` after that prefix, now shared once more; else None."""
        block = self.by_key.get(key)
        if block is None or self.content[block][1] != tokens:
            return None
        self.idle.pop(block, None)
        if self.refs[block] > 1:                       # a sequence holds it already
            self.repeats += 1
        return self.share(block)


class PrefixCachingBlockManager(BlockManager):
    """A ``BlockManager`` whose sequences start from the cached blocks of their prefix."""
    block_key = staticmethod(block_key)

    def __init__(self, n_blocks: int, block_size: int):
        super().__init__(n_blocks, block_size)
        self.allocator, self.keys, self.hit_tokens = CachingAllocator(n_blocks), {}, 0

    def reset(self):
        super().reset()
        self.allocator, self.hit_tokens = CachingAllocator(self.n_blocks), 0
        self.keys.clear()

    def blocks_of(self, tokens, start: int = 0, key=None):
        """``(key, tokens)`` of the full blocks of ``tokens`` from block ``start`` on (``key``:
        that of the block before it)."""
        bs = self.block_size
        for i in range(start, len(tokens) // bs):
            block = tuple(tokens[i * bs:(i + 1) * bs])
            key = self.block_key(key, block)
            yield key, block

    def match(self, seq_id, tokens) -> int:
        """A newcomer's table starts with the cached blocks of its prefix (whole blocks, and at
        least its last token left to compute, for its logits); returns the tokens they hold."""
        table, keys = self.tables.setdefault(seq_id, []), self.keys.setdefault(seq_id, [])
        for key, block in self.blocks_of(tokens[:-1]):
            hit = self.allocator.lookup(key, block)
            if hit is None:
                break
            table.append(hit)
            keys.append(key)
        self.lengths[seq_id] = n = len(table) * self.block_size
        self.hit_tokens += n
        return n

    def written(self, seq_id, tokens, cached: int):
        """The first ``cached`` of ``tokens`` are in the cache: remember its new full blocks
        (up to the first token the host does not know yet, None)."""
        keys = self.keys.setdefault(seq_id, [])
        if cached // self.block_size <= len(keys):          # no block filled up since
            return
        known, table = tokens[:cached], self.tables[seq_id]
        if None in known:
            known = known[:known.index(None)]
        for key, block in self.blocks_of(known, len(keys), keys[-1] if keys else None):
            self.allocator.remember(table[len(keys)], key, block)
            keys.append(key)

    @property
    def tokens_held(self) -> int:
        """Tokens in the cache, a shared block's counted once."""
        return sum(self.lengths.values()) - self.allocator.repeats * self.block_size

    def release(self, seq_id):
        self.keys.pop(seq_id, None)
        super().release(seq_id)
