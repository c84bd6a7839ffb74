"""The paged KV-cache: the block allocator (property-based), block tables, and packed attention
through the block tables, against Hugging Face's logits."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from course_lib.model.attention import PAGED_ATTENTION, block_diagonal_causal
from course_lib.model.kv_cache import BlockAllocator, OutOfBlocks, PagedKVCache
from course_lib.model.llama import LlamaShape
from course_lib.requests import chat_workload
from fakes import FakeLlama

SHAPE = FakeLlama.shape

ops = st.lists(st.tuples(st.sampled_from(["grow", "release"]), st.integers(0, 5), st.integers(1, 40)),
               max_size=60)


def owned(cache):
    return [b for table in cache.tables.values() for b in table]


@settings(max_examples=200, deadline=None)
@given(n_blocks=st.integers(1, 12), block_size=st.integers(1, 8), ops=ops)
def test_no_block_is_owned_twice_and_none_leaks(n_blocks, block_size, ops):
    cache = PagedKVCache(SHAPE, n_blocks, block_size)
    for op, seq, n in ops:
        before = ({k: list(v) for k, v in cache.tables.items()}, dict(cache.lengths),
                  cache.allocator.n_free)
        if op == "grow":
            try:
                cache.grow(seq, n)
            except OutOfBlocks:   # a refused request leaves everything as it was
                assert ({k: list(v) for k, v in cache.tables.items()}, dict(cache.lengths),
                        cache.allocator.n_free) == before
        else:
            cache.release(seq)
        blocks = owned(cache)
        assert len(blocks) == len(set(blocks)), "a block is owned twice"
        assert len(blocks) + cache.allocator.n_free == n_blocks, "a block leaked"
        for s, table in cache.tables.items():   # just enough blocks for the tokens
            assert len(table) == -(-cache.lengths[s] // block_size)
    for seq in list(cache.tables):
        cache.release(seq)
    assert cache.allocator.n_free == n_blocks and not owned(cache)


@settings(max_examples=200, deadline=None)
@given(n_blocks=st.integers(1, 30), block_size=st.integers(1, 8),
       prompts=st.lists(st.integers(1, 20), min_size=1, max_size=6), steps=st.integers(1, 30))
def test_a_decode_step_grows_every_sequence_as_one_by_one_or_none(n_blocks, block_size, prompts, steps):
    """``grow_each`` (the scheduler's one check for a whole decode step) gives the same tables
    as growing the sequences one by one, in the same order; when the free blocks cannot serve
    every sequence it changes nothing."""
    each, one_by_one = (PagedKVCache(SHAPE, n_blocks, block_size) for _ in range(2))
    ids = [s for s, n in enumerate(prompts) if each.can_grow(s, n) and each.grow(s, n) is None]
    for s in ids:
        one_by_one.grow(s, prompts[s])
    for _ in range(steps):
        state = ({k: list(v) for k, v in each.tables.items()}, dict(each.lengths), each.allocator.n_free)
        trial = copy.deepcopy(one_by_one)
        try:                                   # would one by one serve them all?
            for s in ids:
                trial.grow(s, 1)
            room = True
        except OutOfBlocks:
            room = False
        assert each.grow_each(ids) is room
        if not room:
            assert ({k: list(v) for k, v in each.tables.items()}, dict(each.lengths),
                    each.allocator.n_free) == state
            break
        one_by_one = trial
        assert each.tables == one_by_one.tables and each.lengths == one_by_one.lengths


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
        BlockAllocator(0)
    with pytest.raises(ValueError, match="block_size"):
        PagedKVCache(SHAPE, 4, 0)
    with pytest.raises(OutOfBlocks, match="4 KV-cache blocks"):
        a = BlockAllocator(4)
        for _ in range(5):
            a.allocate()


def test_block_table_addresses():
    cache = PagedKVCache(SHAPE, n_blocks=6, block_size=4)
    cache.grow("a", 3)
    cache.grow("b", 5)
    cache.grow("a", 3)            # a: 6 tokens -> a second block, allocated after b's two
    assert cache.tables == {"a": [0, 3], "b": [1, 2]}
    assert cache.slots("a", 0, 6) == [0, 1, 2, 3, 12, 13]
    assert cache.slots("b", 3, 5) == [7, 8]


def test_block_diagonal_causal_mask():
    q_seq, q_pos = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 2])
    k_seq, k_pos = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 1, 0, 1, 2])
    assert block_diagonal_causal(q_seq, q_pos, k_seq, k_pos).int().tolist() == [
        [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 1]]


@pytest.mark.parametrize("block_size,attention", [(1, "gather"), (7, "gather"), (16, "gather"),
                                                  (7, "flex"), (16, "flex"),
                                                  (7, "gathered-flex"), (16, "gathered-flex")])
def test_packed_paged_attention_gives_hf_logits(smollm, smollm_ours, block_size, attention):
    PagedAttention = PAGED_ATTENTION[attention]
    reqs = chat_workload(smollm.tokenizer, n=3)
    cache = PagedKVCache(smollm_ours.shape, n_blocks=200, block_size=block_size)
    for r in reqs:
        cache.grow(r.id, len(r.prompt_tokens))
    attn = PagedAttention(cache, [(r.id, 0, len(r.prompt_tokens)) for r in reqs])
    logits = smollm_ours(torch.tensor([t for r in reqs for t in r.prompt_tokens]), attn.positions, attn)
    assert attn.cu_seqlens.tolist() == [0] + list(torch.tensor([len(r.prompt_tokens) for r in reqs]).cumsum(0))
    nxt = []
    for i, r in enumerate(reqs):                     # prefill: every position of every prompt
        a, b = attn.cu_seqlens[i], attn.cu_seqlens[i + 1]
        ref = smollm.model(torch.tensor([r.prompt_tokens])).logits[0]
        torch.testing.assert_close(logits[a:b], ref, rtol=1e-4, atol=1e-3)
        nxt.append(int(logits[b - 1].argmax()))
    for r in reqs:                                   # decode: one token each, different contexts
        cache.grow(r.id, 1)
    attn = PagedAttention(cache, [(r.id, len(r.prompt_tokens), 1) for r in reqs])
    logits = smollm_ours(torch.tensor(nxt), attn.positions, attn)
    for i, r in enumerate(reqs):
        ref = smollm.model(torch.tensor([r.prompt_tokens + [nxt[i]]])).logits[0, -1]
        torch.testing.assert_close(logits[i], ref, rtol=1e-4, atol=1e-3)


WIDE = LlamaShape(100, 64, 128, 1, 4, 2, 16, 1e4, 1e-5, 0, 4096)     # 4 query heads, 2 KV heads


def scattered_cache(block_size):
    """A paged cache whose sequences grew side by side (their blocks interleave), then lost one
    (``b``) and took two prompts (``e``, 300 tokens, and ``f``, 700: tiles of it see whole tiles)."""
    cache = PagedKVCache(WIDE, n_blocks=6000 // block_size, block_size=block_size)
    for step in range(40):
        for sid in "abcd":
            cache.grow(sid, 1 + step % 5)
    cache.release("b")
    cache.grow("e", 300)
    cache.grow("f", 700)
    return cache


def listed_full(bm):
    """The tiles a block mask lists as *full* (run without the mask), as a dense boolean."""
    full = torch.zeros(bm.full_kv_num_blocks.shape[-1], bm.full_kv_indices.shape[-1], dtype=torch.bool)
    for qt in range(full.shape[0]):
        full[qt, bm.full_kv_indices[0, 0, qt, :bm.full_kv_num_blocks[0, 0, qt]].long()] = True
    return full


@pytest.mark.parametrize("TILE", [128, 64])          # 64: the tile the mask has on CUDA
@pytest.mark.parametrize("block_size", [7, 16, 200])
def test_flex_block_mask_lists_every_tile_a_query_can_see(block_size, TILE, monkeypatch):
    """FlexAttention skips the tiles its block mask does not list (the CPU reference does not,
    so the logits tests cannot catch a missing tile): every (query, slot) pair that the rule
    allows must fall in a listed tile."""
    from course_lib.model import attention
    from course_lib.model.attention import FlexPagedAttention
    monkeypatch.setattr(attention, "mask_tile", lambda device: TILE)
    cache = scattered_cache(block_size)
    seqs = [("a", cache.lengths["a"] - 1, 1), ("c", cache.lengths["c"] - 1, 1),
            ("e", 0, 300), ("d", cache.lengths["d"] - 20, 20), ("f", 0, 700)]
    attn = FlexPagedAttention(cache, seqs)
    assert attn.block_mask.BLOCK_SIZE == (TILE, TILE)
    listed = attn.block_mask.to_dense()[0, 0].bool()                    # (query tiles, slot tiles)
    q = 0
    for sid, cached, new in seqs:
        for p in range(cached, cached + new):
            for slot in cache.slots(sid, 0, p + 1):                     # what query q may see
                assert listed[q // TILE, slot // TILE], (sid, p, slot)
            q += 1
    assert listed.sum() < listed.numel(), "the block mask should skip tiles"
    # a tile listed as full is run without the mask: each of its pairs must be visible
    bm = attn.block_mask
    full = listed_full(bm)
    n_pad, n_slots = bm.seq_lengths
    ok = torch.zeros(n_pad, full.shape[1] * TILE, dtype=torch.bool)
    ok[:, :n_slots] = bm.mask_mod(0, 0, torch.arange(n_pad)[:, None], torch.arange(n_slots)[None, :])
    tiles = ok.view(full.shape[0], TILE, full.shape[1], TILE).all(-1).all(1)   # every pair visible
    assert not (full & ~tiles).any() and full.any()


@pytest.mark.parametrize("block_size", [7, 16])
def test_the_gathered_flex_mask_lists_every_visible_pair_and_full_tiles_are_whole(block_size):
    """GatheredFlexAttention's block mask, made on the host from each query's first and last
    visible key: every (query, key) pair of the block-diagonal causal rule lies in a listed tile,
    a tile listed as full has every pair visible, padding sees nothing, and tiles are skipped.
    Then its output equals the gather reference's, blocks scattered over the cache."""
    from course_lib.model.attention import GatheredFlexAttention, PagedAttention, TILE
    cache, shape = scattered_cache(block_size), WIDE
    seqs = [("e", 0, 300), ("d", cache.lengths["d"] - 20, 20), ("a", cache.lengths["a"] - 1, 1), ("f", 0, 700)]
    attn = GatheredFlexAttention(cache, seqs)
    bm = attn.block_mask
    n_pad, m_pad = bm.seq_lengths
    assert (n_pad, m_pad) == (1024, 2048) and attn.n == 1021
    # the rule, over the packed keys (each sequence's keys in order, one sequence after another)
    q_seq = torch.tensor([i for i, (_, c, n) in enumerate(seqs) for _ in range(n)])
    q_pos = torch.tensor([p for _, c, n in seqs for p in range(c, c + n)])
    k_seq = torch.tensor([i for i, (_, c, n) in enumerate(seqs) for _ in range(c + n)])
    k_pos = torch.tensor([p for _, c, n in seqs for p in range(c + n)])
    rule = torch.zeros(n_pad, m_pad, dtype=torch.bool)
    rule[:len(q_seq), :len(k_seq)] = block_diagonal_causal(q_seq, q_pos, k_seq, k_pos)
    mod = bm.mask_mod(0, 0, torch.arange(n_pad)[:, None], torch.arange(m_pad)[None, :])
    assert torch.equal(mod, rule)                 # padding queries see nothing, padding keys nobody
    listed = bm.to_dense()[0, 0].bool()
    tiles_seen = rule.view(n_pad // TILE, TILE, m_pad // TILE, TILE).any(-1).any(1)
    assert not (tiles_seen & ~listed).any() and listed.sum() < listed.numel()
    full = listed_full(bm)
    whole = rule.view(n_pad // TILE, TILE, m_pad // TILE, TILE).all(-1).all(1)
    assert not (full & ~whole).any() and full.any()
    # the keys it copies are each sequence's, in order
    assert attn.read[:len(k_seq)].tolist() == [s for sid, c, n in seqs for s in cache.slots(sid, 0, c + n)]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(attn.n, shape.n_heads, shape.head_dim, generator=g)
    k, v = (torch.randn(attn.n, shape.n_kv_heads, shape.head_dim, generator=g) for _ in range(2))
    for layer in range(shape.n_layers):
        cache.k[layer].normal_(generator=g)
        cache.v[layer].normal_(generator=g)
    ref = PagedAttention(cache, seqs)(0, q, k, v)
    torch.testing.assert_close(attn(0, q, k, v), ref, rtol=1e-4, atol=1e-5)


def test_the_packed_layout_is_the_per_token_loop():
    shape = LlamaShape(100, 64, 128, 1, 2, 1, 16, 1e4, 1e-5, 0, 4096)
    cache = PagedKVCache(shape, n_blocks=400, block_size=7)
    for step in range(30):                        # interleaved blocks
        for sid in "abc":
            cache.grow(sid, 1 + step % 4)
    seqs = [("a", 5, 3), ("b", cache.lengths["b"] - 1, 1), ("c", 0, cache.lengths["c"])]
    layout = cache.packed_layout(seqs)
    assert layout["positions"].tolist() == [p for _, c, n in seqs for p in range(c, c + n)]
    assert layout["write"].tolist() == [w for sid, c, n in seqs for w in cache.slots(sid, c, c + n)]
    assert layout["q_seq"].tolist() == [i for i, (_, _, n) in enumerate(seqs) for _ in range(n)]
    tables = [cache.tables[sid][:cache.blocks_needed(c + n)] for sid, c, n in seqs]
    assert layout["blocks"].tolist() == [b for t in tables for b in t]
    assert layout["block_index"].tolist() == [j for t in tables for j in range(len(t))]
    assert layout["block_seq"].tolist() == [i for i, t in enumerate(tables) for _ in t]


def test_the_host_time_bench_times_only_steps_where_every_sequence_decodes():
    """``bench/host_time.py`` (the host's cost alone, chapter 09) runs the engine's own code with
    the fake model and the decode step taken out, and leaves the decode graphs' class as it was."""
    import importlib.util
    from pathlib import Path

    from course_lib.kernels.cuda_graphs import DecodeGraphs
    path = Path(__file__).resolve().parent.parent / "bench" / "host_time.py"
    spec = importlib.util.spec_from_file_location("host_time", path)
    host_time = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host_time)
    forward = DecodeGraphs._forward
    row = host_time.round_ms(batch=12, new_tokens=30, repeats=1)
    assert DecodeGraphs._forward is forward
    assert row["batch"] == 12 and 20 <= row["steps"] <= 30            # the shortest answer: 30 tokens
    assert all(row[k] > 0 for k in ("schedule", "launch", "complete"))
    assert row["round"] == pytest.approx(row["schedule"] + row["launch"] + row["complete"])
    assert host_time.fill_ms(8, context=40, repeat=2) > 0
