"""The paged KV-cache's bookkeeping (``course_lib.engines.block_manager``), property-based: no
block is owned twice, free and used blocks add up to the cache, a decode step's ``grow_each``
is growing the sequences one by one or nothing, and reference counts free a shared block with
its last owner."""
import copy

import pytest
from fakes import FakeLlama
from hypothesis import given, settings
from hypothesis import strategies as st

from course_lib.engines.block_manager import BlockAllocator, BlockManager, OutOfBlocks
from course_lib.model.kv_cache import PagedKVCache

ops = st.lists(st.tuples(st.sampled_from(["grow", "release"]), st.integers(0, 5),
                         st.integers(1, 40)), max_size=60)


def owned(blocks):
    return [b for table in blocks.tables.values() for b in table]


def state(blocks):
    return ({k: list(v) for k, v in blocks.tables.items()}, dict(blocks.lengths), blocks.n_free)


@settings(max_examples=200, deadline=None)
@given(n_blocks=st.integers(1, 12), block_size=st.integers(1, 8), ops=ops)
def test_no_block_is_owned_twice_and_none_leaks(n_blocks, block_size, ops):
    blocks = BlockManager(n_blocks, block_size)
    for op, seq, n in ops:
        before = state(blocks)
        if op == "grow":
            try:
                blocks.grow(seq, n)
            except OutOfBlocks:   # a refused request leaves everything as it was
                assert state(blocks) == before
        else:
            blocks.release(seq)
        held = owned(blocks)
        assert len(held) == len(set(held)), "a block is owned twice"
        assert not set(held) & set(blocks.allocator.free_list), "a block is owned and free"
        assert len(held) + blocks.n_free == n_blocks, "free + used != total: a block leaked"
        for s, table in blocks.tables.items():   # just enough blocks for the tokens
            assert len(table) == blocks.blocks_needed(blocks.lengths[s])
    for seq in list(blocks.tables):
        blocks.release(seq)
    assert blocks.n_free == n_blocks and not owned(blocks)


@settings(max_examples=200, deadline=None)
@given(n_blocks=st.integers(1, 30), block_size=st.integers(1, 8),
       prompts=st.lists(st.integers(1, 20), min_size=1, max_size=6), steps=st.integers(1, 30))
def test_a_decode_step_grows_every_sequence_as_one_by_one_or_none(n_blocks, block_size, prompts,
                                                                  steps):
    """``grow_each`` (the scheduler's one check for a whole decode step) gives the same tables
    as growing the sequences one by one, in the same order; when the free blocks cannot serve
    every sequence it changes nothing."""
    each, one_by_one = BlockManager(n_blocks, block_size), BlockManager(n_blocks, block_size)
    ids = [s for s, n in enumerate(prompts) if each.can_grow(s, n) and each.grow(s, n) is None]
    for s in ids:
        one_by_one.grow(s, prompts[s])
    for _ in range(steps):
        before = state(each)
        trial = copy.deepcopy(one_by_one)
        try:                                   # would one by one serve them all?
            for s in ids:
                trial.grow(s, 1)
            room = True
        except OutOfBlocks:
            room = False
        assert each.grow_each(ids) is room
        if not room:
            assert state(each) == before
            break
        one_by_one = trial
        assert state(each) == state(one_by_one)


@settings(max_examples=200, deadline=None)
@given(n_blocks=st.integers(1, 8),
       ops=st.lists(st.tuples(st.sampled_from(["allocate", "share", "free"]), st.integers(0, 20)),
                    max_size=80))
def test_reference_counts_free_a_block_with_its_last_owner(n_blocks, ops):
    """Owners of each block, kept by hand next to the allocator: a block is free exactly when
    nobody holds it, and free + used is always the whole cache."""
    a, holders = BlockAllocator(n_blocks), []          # one entry per holding of a block
    for op, pick in ops:
        if op == "allocate":
            if a.n_free:
                block = a.allocate()
                assert block not in holders, f"block {block} handed out while held"
                holders.append(block)
            else:
                with pytest.raises(OutOfBlocks):
                    a.allocate()
        elif holders:
            block = holders[pick % len(holders)]
            if op == "share":
                holders.append(a.share(block))
            else:
                a.free(block)
                holders.remove(block)
        used = set(holders)
        assert sorted(a.free_list) == sorted(set(range(n_blocks)) - used)
        assert a.n_free + len(used) == n_blocks
        assert all(a.refs[b] == holders.count(b) for b in range(n_blocks))


def test_shared_blocks_are_freed_by_their_last_owner():
    a = BlockAllocator(4)
    block = a.allocate()
    a.share(block)
    a.free(block)
    assert a.n_free == 3              # still held by its second owner
    a.free(block)
    assert a.n_free == 4
    with pytest.raises(ValueError, match="already free"):
        a.free(block)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)
    with pytest.raises(OutOfBlocks, match="4 KV-cache blocks"):
        a = BlockAllocator(4)
        for _ in range(5):
            a.allocate()


def test_block_table_addresses():
    cache = PagedKVCache(FakeLlama.shape, BlockManager(6, 4))
    cache.grow("a", 3)
    cache.grow("b", 5)
    cache.grow("a", 3)            # a: 6 tokens -> a second block, allocated after b's two
    assert cache.tables == {"a": [0, 3], "b": [1, 2]}
    assert cache.slots("a", 0, 6) == [0, 1, 2, 3, 12, 13]
    assert cache.slots("b", 3, 5) == [7, 8]
    cache.blocks.reset()
    assert cache.tables == {} and cache.blocks.n_free == 6
