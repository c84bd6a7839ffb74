"""Prefix caching (``course_lib.engines.prefix_cache``): shared prefixes share full, written
blocks through reference counts; cached blocks no sequence holds are evicted only when a block is
needed, oldest first; and the engine's greedy tokens do not change (against Hugging Face)."""
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_greedy_matches_hf import hf_greedy

from course_lib.engines import EngineOptionError, make_engine
from course_lib.engines.block_manager import OutOfBlocks
from course_lib.engines.prefix_cache import PrefixCachingBlockManager
from course_lib.requests import load_workload

BS = 4


def admit(blocks, sid, tokens) -> int:
    """What the scheduler does for a newcomer fed whole: match, grow the rest, mark it written."""
    hit = blocks.match(sid, tokens)
    blocks.grow(sid, len(tokens) - hit)
    blocks.written(sid, tokens, len(tokens))
    return hit


def check_invariants(blocks, tokens_of):
    a = blocks.allocator
    holders = Counter(b for table in blocks.tables.values() for b in table)
    for b in range(a.n_blocks):          # a reference per table holding it, one for the cache
        assert a.refs[b] == holders[b] + (b in a.content), b
        assert (b in a.free_list) == (a.refs[b] == 0), b
        assert (b in a.idle) == (a.refs[b] == 1 and b in a.content and not holders[b]), b
    assert a.n_free == len(a.free_list) + len(a.idle) == blocks.n_free
    for key, b in a.by_key.items():
        assert a.content[b][0] == key
    assert a.repeats == sum(max(0, n - 1) for n in holders.values())
    for sid, table in blocks.tables.items():     # a shared block holds this sequence's tokens
        tokens = tokens_of[sid]
        for i, b in enumerate(table):
            if b in a.content:
                assert a.content[b][1] == tuple(tokens[i * BS:(i + 1) * BS]), (sid, i)


prompts = st.lists(st.tuples(st.integers(0, 2), st.integers(1, 3), st.integers(1, 14)),
                   max_size=40)


@settings(max_examples=200, deadline=None)
@given(n_blocks=st.integers(2, 16), ops=prompts)
def test_sharing_never_breaks_the_books(n_blocks, ops):
    """Requests built from one of three prefixes, admitted and released at random."""
    blocks, tokens_of, live = PrefixCachingBlockManager(n_blocks, BS), {}, []
    for i, (prefix, words, extra) in enumerate(ops):
        if live and extra % 3 == 0:
            blocks.release(live.pop(extra % len(live)))
        else:
            tokens = [100 + prefix] * (words * BS) + [i] * extra
            try:
                admit(blocks, i, tokens)
                tokens_of[i] = tokens
                live.append(i)
            except OutOfBlocks:
                blocks.release(i)             # what the scheduler's preemption does
        check_invariants(blocks, tokens_of)


def test_a_shared_prefix_is_computed_once_and_evicted_only_when_needed():
    blocks = PrefixCachingBlockManager(6, BS)
    system = list(range(8))                              # two full blocks
    assert admit(blocks, "a", system + [50, 51]) == 0
    assert admit(blocks, "b", system + [60]) == 8        # a's two blocks, shared
    assert blocks.tables["a"][:2] == blocks.tables["b"][:2]
    blocks.release("a")
    blocks.release("b")
    assert blocks.n_free == 6                            # cached blocks count as free ...
    assert admit(blocks, "c", [7] * 9) == 0              # 3 blocks, from the free list
    assert admit(blocks, "d", system + [70]) == 8        # ... and are still there: a hit
    blocks.release("d")
    blocks.release("c")
    admit(blocks, "e", [9] * 24)                         # all 6 blocks: the cache is evicted
    assert not blocks.allocator.by_key.keys() - {k for k in blocks.keys["e"]}
    assert blocks.match("f", system + [1]) == 0


def test_the_last_token_is_always_computed_and_a_partial_block_never_shared():
    blocks = PrefixCachingBlockManager(8, BS)
    assert admit(blocks, "a", list(range(8))) == 0
    assert blocks.match("b", list(range(8))) == 4        # 7 tokens to match: one full block
    blocks.grow("w", 6)
    blocks.written("w", [1, 2, 3, 4, 5, None], 6)        # block 2 not known on the host yet
    assert len(blocks.keys["w"]) == 1


def test_prefix_caching_keeps_hugging_face_s_greedy_tokens(smollm):
    """Six requests on two system prompts, chunked; in 14 blocks of 8 it must also preempt."""
    requests = load_workload("prefix:prefixes=2,prefix_len=40,question_len=6,mean=6,cap=10",
                             n=6, vocab_size=len(smollm.tokenizer))
    expected = [hf_greedy(smollm, r.prompt_tokens, r.max_new_tokens) for r in requests]
    runs = {}
    for on, num_blocks in ((False, None), (True, None), (True, 14)):
        engine = make_engine("chunked", smollm, max_batch=3, max_num_batched_tokens=32,
                             block_size=8, num_blocks=num_blocks, prefix_caching=on)
        log = engine.run(requests)
        assert [r.output_tokens for r in log.requests] == expected, (on, num_blocks)
        runs[on, num_blocks] = engine, sum(s.prefill_tokens for s in log.steps)
    (_, computed), (shared, computed_shared), (small, computed_small) = runs.values()
    assert shared.prefix_hit_tokens >= 3 * 40            # later requests found their prefix
    assert computed_shared == computed - shared.prefix_hit_tokens
    assert small.preemptions > 0 and small.prefix_hit_tokens > shared.prefix_hit_tokens


def test_flex_attention_is_refused_over_shared_blocks(smollm, monkeypatch):
    """FlexAttention's paged mask gives each block one sequence: over a prefix cache it answered
    wrongly (a sequence could not see the prefix it shares). The combination is refused, and the
    ``paged`` engine's CUDA default (flex) falls back to gather when prefix caching is on."""
    import course_lib.engines as engines

    with pytest.raises(EngineOptionError, match="flex.*prefix_caching"):
        make_engine("chunked", smollm, attention="flex", prefix_caching=True)
    monkeypatch.setattr(engines, "on_cuda", lambda loaded, model=None: True)  # CUDA's defaults
    assert make_engine("paged", smollm, prefix_caching=True).attention == "gather"
    assert make_engine("paged", smollm).attention == "flex"
