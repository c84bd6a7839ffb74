"""The scheduling rules of the static, dynamic and continuous engines, checked step by step with
a fake model (no weights: milliseconds)."""
import pytest
from fakes import make_engine, req

from course_lib.engines import ContinuousEngine, DynamicEngine, StaticEngine
from course_lib.requests import Request

ENGINES = [StaticEngine, DynamicEngine, ContinuousEngine]


def schedule(log, kind=None):
    """Which requests computed a useful token in each step (in request order)."""
    order = {r.id: i for i, r in enumerate(log.requests)}
    return [sorted(s.active, key=order.get) for s in log.steps if kind is None or s.kind == kind]


def seed_requests():
    # Req1 finishes after 3 tokens, Req3 after 4: the seed chapter's four-step picture
    return [req("Req1", 3), req("Req2", 8), req("Req3", 4), req("Req4", 5), req("Req5", 5)]


@pytest.mark.parametrize("cls", [DynamicEngine, ContinuousEngine])
def test_the_seeds_four_steps(cls):
    log = make_engine(cls, 3).run(seed_requests())
    assert schedule(log, "decode")[:4] == [
        ["Req1", "Req2", "Req3"],
        ["Req1", "Req2", "Req3"],
        ["Req2", "Req3", "Req4"],     # Req1 finished, Req4 added
        ["Req2", "Req4", "Req5"],     # Req3 finished, Req5 added
    ]
    assert schedule(log, "prefill") == [["Req1", "Req2", "Req3"], ["Req4"], ["Req5"]]


def test_static_runs_each_batch_until_its_longest_request_is_done():
    log = make_engine(StaticEngine, 3).run(seed_requests())
    assert schedule(log) == (
        [["Req1", "Req2", "Req3"]] * 3 + [["Req2", "Req3"]] + [["Req2"]] * 4      # batch 1
        + [["Req4", "Req5"]] * 5)                                                 # batch 2
    # finished rows keep computing: every decode step of batch 1 computes 3 slots
    assert [s.slots for s in log.steps if s.kind == "decode"][:7] == [3] * 7


def test_continuous_wastes_no_slots_where_static_does():
    static = make_engine(StaticEngine, 3).run(seed_requests())
    cont = make_engine(ContinuousEngine, 3).run(seed_requests())
    def util(log):
        return sum(s.useful for s in log.steps) / sum(s.slots for s in log.steps)
    assert util(cont) == 1.0
    # static, batch 1: 9 prompt slots, then 7 decode steps x 3 rows of which 2 + 7 + 3 useful;
    # batch 2: 6 prompt slots, 4 decode steps x 2 rows, all useful
    assert util(static) == pytest.approx((9 + 12 + 6 + 8) / (9 + 21 + 6 + 8))
    assert len(static.steps) > len(cont.steps)


def test_dynamic_pads_newcomers_to_the_batch_length():
    log = make_engine(DynamicEngine, 3).run(seed_requests())
    refills = [s for s in log.steps if s.kind == "prefill"][1:]
    # Req4 joins when the shared cursor is at column 5 (3 prompt + 2 decodes): 2 pad slots
    assert [(s.slots, s.useful) for s in refills] == [(5, 3), (6, 3)]


def test_dynamic_newcomer_longer_than_the_batch_waits_for_it_to_drain():
    rs = [req("a", 2), req("b", 6), req("long", 2, prompt_len=20)]
    log = make_engine(DynamicEngine, 2).run(rs)
    # "long" cannot be left-aligned with a 3-column batch: it waits until "b" is done
    assert schedule(log) == [["a", "b"], ["a", "b"], ["b"], ["b"], ["b"], ["b"], ["long"], ["long"]]
    cont = make_engine(ContinuousEngine, 2).run(rs)
    assert schedule(cont)[2] == ["long"]           # continuous admits it as soon as "a" leaves


@pytest.mark.parametrize("cls", ENGINES)
def test_one_request(cls):
    log = make_engine(cls, 4).run([req("only", 3)])
    assert log.requests[0].output_tokens == [4, 3, 2] and log.requests[0].finish_reason == "eos"
    assert schedule(log) == [["only"]] * 3
    assert [s.rows for s in log.steps] == [1, 1, 1]


@pytest.mark.parametrize("cls", ENGINES)
def test_more_slots_than_requests(cls):
    log = make_engine(cls, 8).run([req("x", 2), req("y", 4)])
    assert schedule(log) == [["x", "y"], ["x", "y"], ["y"], ["y"]]
    # as many rows as requests, not max_batch; static keeps x's finished row to the end, the
    # others drop it
    want = [2, 2, 2, 2] if cls is StaticEngine else [2, 2, 1, 1]
    assert [s.rows for s in log.steps] == want


@pytest.mark.parametrize("cls", ENGINES)
def test_all_finish_at_once(cls):
    rs = [req(f"r{i}", 3) for i in range(6)]
    log = make_engine(cls, 3).run(rs)
    assert schedule(log) == [["r0", "r1", "r2"]] * 3 + [["r3", "r4", "r5"]] * 3
    assert all(r.output_tokens == [4, 3, 2] for r in log.requests)


@pytest.mark.parametrize("cls", ENGINES)
def test_max_new_tokens_ends_a_request(cls):
    rs = [Request("capped", [9, 30], max_new_tokens=4), req("short", 2)]
    log = make_engine(cls, 2).run(rs)
    by = {r.id: r for r in log.requests}
    assert by["capped"].output_tokens == [29, 28, 27, 26] and by["capped"].finish_reason == "length"
    assert by["short"].finish_reason == "eos"


@pytest.mark.parametrize("cls", ENGINES)
def test_ignore_eos_goes_on_to_max_new_tokens(cls):
    rs = [Request("on", [9, 4], max_new_tokens=5, ignore_eos=True)]
    log = make_engine(cls, 1).run(rs)
    assert log.requests[0].output_tokens == [3, 2, 2, 2, 2]
    assert log.requests[0].finish_reason == "length"


def test_continuous_admits_late_arrivals_when_they_arrive():
    rs = [req("early", 3), req("late", 2, arrival=0.15)]
    log = make_engine(ContinuousEngine, 4).run(rs)
    late = {r.id: r for r in log.requests}["late"]
    assert schedule(log) == [["early"], ["early"], ["early"], ["late"], ["late"]]
    assert late.token_times[0] >= 0.15 and late.ttft_s < 0.1


def test_static_batch_waits_for_its_last_member():
    rs = [req("a", 2), req("b", 2, arrival=0.1)]
    log = make_engine(StaticEngine, 2).run(rs)
    assert log.steps[0].start_s >= 0.1 and schedule(log)[0] == ["a", "b"]


@pytest.mark.parametrize("cls", ENGINES)
def test_every_token_is_accounted_for(cls):
    log = make_engine(cls, 3).run(seed_requests())
    out = sum(len(r.output_tokens) for r in log.requests)
    assert sum(s.decode_tokens for s in log.steps) == out - len(log.requests)
    assert sum(s.prefill_tokens for s in log.steps) == 3 * len(log.requests)
    assert all(s.useful <= s.slots for s in log.steps)


@pytest.mark.parametrize("cls", ENGINES)
def test_bad_requests_are_refused_and_the_rest_served(cls):
    rs = [Request("empty", [], 4), Request("zero", [5, 6], 0), req("fine", 3)]
    log = make_engine(cls, 2).run(rs)
    by = {r.id: r for r in log.requests}
    assert by["empty"].finish_reason == "refused" and "empty" in by["empty"].error
    assert by["zero"].finish_reason == "refused" and "max_new_tokens" in by["zero"].error
    assert by["fine"].output_tokens == [4, 3, 2]


@pytest.mark.parametrize("cls", ENGINES)
def test_max_batch_below_one_is_refused(cls):
    with pytest.raises(ValueError, match="max_batch"):
        make_engine(cls, 0)
