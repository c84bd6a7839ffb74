"""The paged KV-cache: packed attention through the block tables, against Hugging Face's logits,
and the layouts and masks it builds (the bookkeeping's own tests: test_block_manager.py)."""
import pytest
import torch
from fakes import FakeLlama

from course_lib.engines.block_manager import BlockManager
from course_lib.engines.model_runner import ATTENTION
from course_lib.model.attention import block_diagonal_causal
from course_lib.model.kv_cache import PagedKVCache
from course_lib.model.llama import LlamaShape
from course_lib.requests import chat_workload

SHAPE = FakeLlama.shape

def test_block_diagonal_causal_mask():
    q_seq, q_pos = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 2])
    k_seq, k_pos = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 1, 0, 1, 2])
    assert block_diagonal_causal(q_seq, q_pos, k_seq, k_pos).int().tolist() == [
        [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 1]]


@pytest.mark.parametrize("block_size,attention", [(1, "gather"), (7, "gather"), (16, "gather"),
                                                  (7, "flex"), (16, "flex"),
                                                  (7, "gathered-flex"), (16, "gathered-flex")])
def test_packed_paged_attention_gives_hf_logits(smollm, smollm_ours, block_size, attention):
    PagedAttention = ATTENTION[attention]
    reqs = chat_workload(smollm.tokenizer, n=3)
    cache = PagedKVCache(smollm_ours.shape, BlockManager(200, block_size))
    for r in reqs:
        cache.grow(r.id, len(r.prompt_tokens))
    attn = PagedAttention(cache, [(r.id, 0, len(r.prompt_tokens)) for r in reqs])
    logits = smollm_ours(torch.tensor([t for r in reqs for t in r.prompt_tokens]), attn.positions,
                         attn)
    lengths = torch.tensor([len(r.prompt_tokens) for r in reqs])
    assert attn.cu_seqlens.tolist() == [0] + list(lengths.cumsum(0))
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
    (``b``) and took two prompts (``e``, 300 tokens, and ``f``, 700: tiles of it see whole
    tiles)."""
    cache = PagedKVCache(WIDE, BlockManager(6000 // block_size, block_size))
    for step in range(40):
        for sid in "abcd":
            cache.grow(sid, 1 + step % 5)
    cache.release("b")
    cache.grow("e", 300)
    cache.grow("f", 700)
    return cache


def listed_full(bm):
    """The tiles a block mask lists as *full* (run without the mask), as a dense boolean."""
    full = torch.zeros(bm.full_kv_num_blocks.shape[-1], bm.full_kv_indices.shape[-1],
                       dtype=torch.bool)
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
    ok[:, :n_slots] = bm.mask_mod(0, 0, torch.arange(n_pad)[:, None],
                                  torch.arange(n_slots)[None, :])
    tiles = ok.view(full.shape[0], TILE, full.shape[1], TILE).all(-1).all(1)   # every pair visible
    assert not (full & ~tiles).any() and full.any()


@pytest.mark.parametrize("block_size", [7, 16])
def test_the_gathered_flex_mask_lists_every_visible_pair_and_full_tiles_are_whole(block_size):
    """GatheredFlexAttention's block mask, made on the host from each query's first and last
    visible key: every (query, key) pair of the block-diagonal causal rule lies in a listed tile,
    a tile listed as full has every pair visible, padding sees nothing, and tiles are skipped.
    Then its output equals the gather reference's, blocks scattered over the cache."""
    from course_lib.model.attention import TILE, GatheredFlexAttention, PagedAttention
    cache, shape = scattered_cache(block_size), WIDE
    seqs = [("e", 0, 300), ("d", cache.lengths["d"] - 20, 20), ("a", cache.lengths["a"] - 1, 1),
            ("f", 0, 700)]
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
    assert attn.read[:len(k_seq)].tolist() == [s for sid, c, n in seqs
                                               for s in cache.slots(sid, 0, c + n)]
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
    cache = PagedKVCache(shape, BlockManager(400, 7))
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
    the fake model and the decode step taken out, and leaves the engine's classes as they were."""
    import importlib.util
    from pathlib import Path

    from course_lib.engines.model_runner import ModelRunner
    from course_lib.engines.paged import PagedEngine
    from course_lib.engines.scheduler import Scheduler
    path = Path(__file__).resolve().parent.parent / "bench" / "host_time.py"
    spec = importlib.util.spec_from_file_location("host_time", path)
    host_time = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host_time)
    before = [vars(c).copy() for c in (Scheduler, ModelRunner, PagedEngine)]
    row = host_time.round_ms(batch=12, new_tokens=30, repeats=1)
    assert [vars(c) for c in (Scheduler, ModelRunner, PagedEngine)] == before
    assert row["batch"] == 12 and 20 <= row["steps"] <= 30            # the shortest answer: 30
    assert all(row[k] > 0 for k in ("schedule", "launch", "complete"))
    assert row["round"] == pytest.approx(row["schedule"] + row["launch"] + row["complete"])
    assert host_time.fill_ms(8, context=40, repeat=2) > 0
