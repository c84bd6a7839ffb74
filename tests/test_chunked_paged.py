"""The packed, chunked, paged continuous engine (chapters 05-07), on the fake model."""
import pytest
from fakes import LOADED, FakeLlama, req

from course_lib.engines import make_engine
from course_lib.model.kv_cache import kv_bytes_per_token
from course_lib.requests import Request


def engine(**options):
    return make_engine("continuous", LOADED, model=FakeLlama(), **options)


def outputs(log):
    return {r.id: (r.output_tokens, r.finish_reason) for r in log.requests}


def test_a_long_prompt_is_chunked_under_the_budget_while_others_decode():
    rs = [req("a", 12), req("b", 12), req("long", 3, prompt_len=20, arrival=0.0)]
    log = engine(max_batch=3, max_num_batched_tokens=6, block_size=4).run(rs)
    assert all(s.slots <= 6 for s in log.steps)
    # the seed's [PPP][D][D][PPP]: the long prompt goes in chunks, and every step carries the
    # decodes of a and b first
    steps = log.steps
    long_steps = [s for s in steps if "long" in s.active and s.prefill_tokens]
    # 20 prompt tokens, 4 a step: what the budget of 6 leaves after a's and b's decodes
    assert [(s.prefill_tokens, s.decode_tokens) for s in long_steps] == [(4, 2)] * 5
    assert outputs(log)["long"] == ([4, 3, 2], "eos")


def test_without_a_budget_a_step_takes_whole_prompts_with_the_decodes():
    rs = [req("a", 5), req("b", 2, prompt_len=9)]
    log = engine(max_batch=1, block_size=4).run(rs)
    assert [(s.prefill_tokens, s.decode_tokens) for s in log.steps] == [
        (3, 0)] + [(0, 1)] * 4 + [(9, 0), (0, 1)]


def test_preempted_requests_are_recomputed_and_say_the_same():
    rs = [Request(f"r{i}", [7] * (3 + i) + [8 + i], max_new_tokens=12) for i in range(6)]
    roomy = engine(max_batch=4, block_size=2, num_blocks=60)
    tight = engine(max_batch=4, block_size=2, num_blocks=12)
    a, b = roomy.run(rs), tight.run(rs)
    assert roomy.preemptions == 0 and tight.preemptions > 0
    assert outputs(a) == outputs(b)
    assert tight.cache.blocks.n_free == 12 and not tight.cache.tables     # nothing leaked


def test_a_request_that_can_never_fit_is_refused_and_the_others_served():
    rs = [Request("huge", [7] * 30 + [9], max_new_tokens=40),
          Request("ok", [7, 7, 5], max_new_tokens=8)]
    log = engine(max_batch=2, block_size=4, num_blocks=10).run(rs)
    by = {r.id: r for r in log.requests}
    assert by["huge"].finish_reason == "refused"
    assert "needs 18 KV-cache blocks of 4 tokens, the cache has 10" in by["huge"].error
    assert by["ok"].output_tokens == [4, 3, 2]


@pytest.mark.parametrize("option,value", [("max_num_batched_tokens", 0), ("block_size", 0),
                                          ("num_blocks", 0), ("attention", "sparse"),
                                          ("kv_memory_bytes", 100)])
def test_settings_that_cannot_work_are_named(option, value):
    with pytest.raises(ValueError, match=option):
        engine(max_batch=2, **{option: value})


def test_paged_options_belong_to_the_paged_engines():
    with pytest.raises(ValueError, match="engine 'static' does not take 'block_size'"):
        make_engine("static", LOADED, model=FakeLlama(), max_batch=2, block_size=16)


def test_blocks_follow_the_tokens():
    rs = [Request("a", [7] * 4 + [8], max_new_tokens=8)]           # answers 7, 6, ..., 2
    e = engine(max_batch=1, block_size=4, num_blocks=8)
    seen = []
    step = e.step

    def spy(*args):
        step(*args)
        seen.append(len(e.cache.tables.get("a", [])))
    e.step = spy
    e.run(rs)
    # 5 prompt tokens -> 2 blocks; a third block once the answer passes 8 tokens in the cache
    assert seen[0] == 2 and max(seen[:-1]) == 3 and seen[-1] == 0


def test_paging_wastes_less_memory_than_full_rows():
    from fakes import make_engine as make_padded

    from course_lib.engines import ContinuousEngine
    from course_lib.measure.metrics import summarize
    rs = [Request(f"r{i}", [7] * 5 + [3 + 4 * i], max_new_tokens=60) for i in range(6)]
    rows = summarize(make_padded(ContinuousEngine, 3).run(rs))
    paged = summarize(engine(max_batch=3, block_size=4).run(rs))
    assert paged["kv_waste"] < 0.5 * rows["kv_waste"]
    assert paged["kv_tokens_reserved_peak"] < rows["kv_tokens_reserved_peak"]


def test_inter_token_gaps_are_measured():
    from course_lib.measure.metrics import summarize
    log = engine(max_batch=2, block_size=4).run([req("a", 4), req("b", 3)])
    m = summarize(log)
    gaps = [g for r in log.requests for g in r.gaps_s]
    assert len(gaps) == 3 + 2 and m["itl_s"]["max"] == max(gaps)


def test_step_plots_and_budget_explorer(monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    from course_lib.lab import plots, widgets
    log = engine(max_batch=2, block_size=4, max_num_batched_tokens=4).run(
        [req("a", 4, prompt_len=9)])
    ax = plots.step_composition(log)
    assert len(ax.patches) == 2 * len(log.steps)
    assert len(plots.token_gaps(log).lines) == 1
    calls = []
    monkeypatch.setattr("course_lib.engines.make_engine", lambda *a, **k: calls.append(a))
    widgets.budget_explorer(None, [], budgets=(4, 8))
    widgets.block_size_explorer(None, [], sizes=(4, 8))
    assert calls == []                      # nothing runs until the learner clicks
    matplotlib.pyplot.close("all")


def test_interference_workload_sends_long_prompts_mid_stream(smollm):
    from course_lib.requests import interference_workload
    rs = interference_workload(smollm.tokenizer, 49152, n_chat=3, n_long=2, long_len=100)
    assert [r.arrival_s for r in rs] == [0, 0, 0, 1.0, 2.0]
    assert [len(r.prompt_tokens) for r in rs[3:]] == [100, 100]
    assert all(r.ignore_eos for r in rs[3:])


def test_block_map_shows_every_owner():
    import matplotlib
    matplotlib.use("Agg")
    from course_lib.lab import plots
    e = engine(max_batch=2, block_size=2, num_blocks=8)
    e.run([Request("a", [7, 7, 6], max_new_tokens=6), Request("b", [7, 7, 7, 5], max_new_tokens=6)])
    assert len(e.block_trace) == len(e.steps) and e.block_trace[-1] == {}
    ax = plots.block_map(e.block_trace, 8)
    assert ax.images[0].get_array().shape == (8, len(e.steps))
    matplotlib.pyplot.close("all")


def test_long_prompts_chunked_into_a_tight_cache_all_finish():
    rs = [Request(f"p{i}", [7] * 29 + [5 + i], max_new_tokens=6) for i in range(3)]
    e = engine(max_batch=3, block_size=4, num_blocks=10, max_num_batched_tokens=24)
    log = e.run(rs)
    assert [r.output_tokens for r in log.requests] == [[4, 3, 2], [5, 4, 3, 2], [6, 5, 4, 3, 2]]
    assert e.cache.blocks.n_free == 10 and not e.cache.tables


def test_a_memory_budget_in_bytes_becomes_blocks():
    per_token = kv_bytes_per_token(FakeLlama().shape, 4)
    budget = 10 * 4 * per_token + 5
    assert engine(max_batch=2, block_size=4, kv_memory_bytes=budget).num_blocks == 10
    with pytest.raises(ValueError, match="not both"):
        engine(max_batch=2, block_size=4, num_blocks=3, kv_memory_bytes=10 * 4 * per_token)
