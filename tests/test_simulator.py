"""The step-cost model and the simulator: the fit recovers known costs, simulated runs keep the
engines' rules (every request served, lengths as asked) on a virtual clock, and a model fitted to
one real run predicts another."""
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from course_lib import bench
from course_lib.engines import make_engine
from course_lib.lab.nbtools import load_result
from course_lib.measure.costmodel import (
    FEATURES,
    StepCost,
    features,
    nonnegative_fit,
    run_name,
    with_host_time,
)
from course_lib.measure.metrics import Step, summarize
from course_lib.measure.simulator import CostBook, path_of, simulate
from course_lib.model.llama import LlamaShape
from course_lib.requests import Request, chat_workload, poisson_arrivals

SHAPE = LlamaShape.from_config(LlamaConfig(hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2,
                                           vocab_size=100, eos_token_id=2))


def flat_cost(seconds_per_step=0.01, per_row=0.0):
    coef = dict.fromkeys(FEATURES, 0.0)
    coef.update(overhead=seconds_per_step, per_row=per_row)
    return StepCost(coef, "test device", float("inf"), float("inf"))   # no weights term


def test_the_fit_recovers_known_costs_and_keeps_them_nonnegative():
    rng = np.random.default_rng(0)
    X = np.column_stack([np.ones(200), rng.integers(1, 64, 200), rng.uniform(1e8, 1e9, 200),
                         rng.uniform(1e9, 1e12, 200), rng.uniform(0, 1e6, 200)])
    true = np.array([2e-3, 1e-4, 1 / 2e12, 0.0, 3e-10])
    c = nonnegative_fit(X, X @ true)
    np.testing.assert_allclose(c, true, rtol=1e-6, atol=1e-15)
    noisy = X @ true - 5e-3 * X[:, 3] / 1e12                     # a feature that "speeds up"
    assert (nonnegative_fit(X, noisy) >= 0).all()


def test_a_simulated_step_takes_the_predicted_time():
    reqs = [Request("a", [5, 6, 7], max_new_tokens=5)]
    _, log = simulate("sequential", reqs, flat_cost(0.01), SHAPE, 2, max_batch=1)
    r = log.requests[0]
    assert len(r.output_tokens) == 5 and r.finish_reason == "length"
    assert 2 not in r.output_tokens                              # never EOS
    np.testing.assert_allclose(r.token_times, [0.01, 0.02, 0.03, 0.04, 0.05])
    np.testing.assert_allclose(r.tpot_s, 0.01)


@pytest.mark.parametrize("engine,options", [
    ("static", {}), ("dynamic", {}), ("continuous", {}),
    ("continuous", {"block_size": 4, "num_blocks": 6, "max_num_batched_tokens": 8}),
    ("paged", {"block_size": 4, "num_blocks": 6, "max_num_batched_tokens": 8}),
    ("fast", {"block_size": 4, "num_blocks": 6, "max_num_batched_tokens": 8}),
])
def test_simulated_runs_serve_every_request_with_its_length(engine, options):
    reqs = [Request(f"r{i}", [3] * (2 + i % 5), max_new_tokens=1 + (7 * i) % 9) for i in range(20)]
    reqs = poisson_arrivals(reqs, rate=100.0, seed=1)
    t = time.perf_counter()
    eng, log = simulate(engine, reqs, flat_cost(0.01, per_row=1e-3), SHAPE, 2, max_batch=4,
                        **options)
    assert time.perf_counter() - t < 10                          # simulated seconds are free
    by = {r.id: r for r in log.requests}
    assert all(len(by[q.id].output_tokens) == q.max_new_tokens for q in reqs)
    assert all(by[q.id].ttft_s > 0 for q in reqs)
    assert max(s.rows for s in log.steps) <= 4
    if "num_blocks" in options:
        assert eng.preemptions > 0, "the test should exercise preemption"


def test_the_book_names_a_path_it_has_no_model_for():
    assert path_of("static", {}) == "padded"
    assert path_of("continuous", {"block_size": 16}) == "gather"
    assert path_of("continuous", {"block_size": 16, "attention": "flex"}) == "flex"
    # the engines by name take their own attention, where the options do not say
    assert path_of("chunked", {}) == "gather" and path_of("fast", {}) == "kernel"
    assert path_of("paged", {}) == "gather" and path_of("paged", {}, cuda=True) == "flex"
    assert path_of("paged", {"attention": "gather"}, cuda=True) == "gather"
    book = CostBook({"padded": flat_cost()})
    with pytest.raises(ValueError, match="no cost model for the 'gather' path"):
        book.for_run("continuous", {"block_size": 16})


def test_bench_simulate_writes_the_same_json_marked_simulated(tmp_path):
    cost = tmp_path / "cost.json"
    CostBook({"padded": flat_cost(0.02), "gather": flat_cost(0.01)}).save(cost)
    out = tmp_path / "sim.json"
    bench.main(["--engine", "continuous", "--model", "llama-1b-dummy", "--dtype", "bfloat16",
                "--workload", "anyscale:prompt_len=32,cap=16,mean=8", "--n", "12",
                "--max-batch", "4", "--arrival-rate", "20", "--simulate", str(cost),
                "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["simulated"] is True and r["device"]["type"] == "simulated"
    assert r["arrival_rate"] == 20 and r["metrics"]["served"] == 12
    assert r["metrics"]["step_time_s"]["p50"] == pytest.approx(0.02)     # every step: the model's
    assert {"engine", "model", "metrics", "requests", "versions", "command"} <= set(r)


def test_bad_arrival_rates_are_named():
    with pytest.raises(ValueError, match="arrival rate"):
        bench.bench("continuous", arrival_rate=-1.0, simulate=CostBook({"padded": flat_cost()}))


def test_a_model_fitted_to_real_runs_predicts_another(smollm):
    """Calibrate on runs at batch 2 and 8 (all at once), predict a run at batch 4 with requests
    arriving over time (real model, this machine)."""
    from course_lib.measure.roofline import measure_peaks
    from course_lib.measure.simulator import compare, with_lengths
    reqs = chat_workload(smollm.tokenizer, n=12, max_new_tokens=12)
    # one thread, as bench/gpu/cpu_simulator.sh: with two, a test running beside this one on the
    # other core stalls every matmul at its barrier, and the runs stop resembling one another
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        shape, peaks = LlamaShape.from_config(smollm.config), measure_peaks("cpu", torch.float32)
        logs = {b: make_engine("continuous", smollm, max_batch=b).run(reqs) for b in (2, 8)}
        cost = StepCost.fit_steps(logs[2].steps + logs[8].steps, shape, 4, peaks)
        online = poisson_arrivals(reqs, rate=4.0, seed=3)
        real = make_engine("continuous", smollm, max_batch=4).run(online)
    finally:
        torch.set_num_threads(threads)
    _, sim = simulate("continuous", with_lengths(online, real), cost, shape, 4, max_batch=4)
    err = compare(summarize(real), summarize(sim))
    # a loose bound, for a shared 2-core machine; the course reports the measured errors
    assert abs(err["output_tokens_per_s"]["error"]) < 0.35, err
    assert abs(err["e2e_p50_s"]["error"]) < 0.35, err


def test_a_kv_memory_budget_counts_the_simulated_models_bytes():
    per_token = 2 * SHAPE.n_layers * SHAPE.n_kv_heads * SHAPE.head_dim * 2     # bf16, GQA
    eng, _ = simulate("continuous", [Request("a", [3] * 4, max_new_tokens=2)], flat_cost(),
                      SHAPE, 2, max_batch=1, block_size=4, kv_memory_bytes=10 * 4 * per_token)
    assert eng.num_blocks == 10


def test_the_simulated_gpu_runs_overlapped_steps_back_to_back():
    """With ``overlap`` the simulated GPU queues each step behind the one in flight: with room
    for everyone the steps, their times and every token's time are those of the waited-for run
    (the host costs nothing in a simulation); in a tight cache the decisions are the overlapped
    engine's own (sequences leave at launch, a preempted one waits for its token in flight)."""
    reqs = [Request(f"r{i}", [3] * (6 + 5 * i), max_new_tokens=4 + 3 * i) for i in range(8)]
    cost = flat_cost(0.01, per_row=0.001)
    runs = {ov: simulate("continuous", reqs, cost, SHAPE, 2, max_batch=4, block_size=4,
                         max_num_batched_tokens=16, overlap=ov) for ov in (False, True)}
    (_, waited), (eng, overlapped) = runs[False], runs[True]
    assert eng.overlap
    assert [(s.start_s, s.end_s, s.rows) for s in overlapped.steps] == \
        [(s.start_s, s.end_s, s.rows) for s in waited.steps]
    assert [r.token_times for r in overlapped.requests] == [r.token_times for r in waited.requests]
    steps = overlapped.steps
    assert all(a.end_s == pytest.approx(b.start_s) for a, b in zip(steps, steps[1:]))
    # tight: the simulation makes the decisions the overlapped engine itself makes (fake model)
    from dataclasses import replace

    from fakes import LOADED, FakeLlama
    tight = dict(max_batch=4, block_size=4, num_blocks=14, max_num_batched_tokens=16, overlap=True)
    sim_eng, sim = simulate("continuous", reqs, cost, SHAPE, 2, **tight)
    real_eng = make_engine("continuous", LOADED, model=FakeLlama(), **tight)
    real = real_eng.run([replace(r, ignore_eos=True) for r in reqs])
    assert sim_eng.preemptions == real_eng.preemptions > 0
    assert [(s.rows, s.prefill_tokens, s.decode_tokens) for s in sim.steps] == \
        [(s.rows, s.prefill_tokens, s.decode_tokens) for s in real.steps]


def test_simulate_takes_every_workload_a_measured_run_takes(tmp_path):
    """A JSONL file with text prompts needs the tokenizer in a simulated run too, from the
    command line as from Python."""
    cost = tmp_path / "cost.json"
    CostBook({"gather": flat_cost()}).save(cost)
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_text('{"id": "a", "prompt": "Who are you?", "max_new_tokens": 5}\n'
                     '{"id": "b", "prompt_tokens": [5, 6, 7], "max_new_tokens": 3}\n')
    r = bench.bench("continuous", workload=str(jsonl), max_batch=2, simulate=str(cost),
                    engine_options={"block_size": 16})
    assert r["simulated"] and r["metrics"]["served"] == 2 and r["metrics"]["output_tokens"] == 8
    out = tmp_path / "sim.json"
    bench.main(["--engine", "continuous", "--block-size", "16", "--workload", str(jsonl),
                "--simulate", str(cost),
                "--json", str(out)])
    assert json.loads(out.read_text())["metrics"]["output_tokens"] == 8


def test_dense_pairs_price_a_step_that_mixes_a_prompt_with_decodes():
    """One masked attention over packed sequences computes every query against every key: fitted
    to prefill-only and decode-only steps, the model must still price a mixed step."""
    true = dict.fromkeys(FEATURES, 0.0)
    true.update(overhead=0.01, per_flop=1e-11, per_dense_pair=2e-8)
    truth = StepCost(true, "test device", float("inf"), float("inf"))
    # (rows, tokens, attended, kv_read): prompts alone, decodes alone; then a mixed step
    shapes = [(1, n, n * (n + 1) // 2, 0) for n in (16, 40, 90, 200)]
    shapes += [(b, b, b * (c + 1), b * c) for b in (2, 5, 8) for c in (30, 120)]
    steps = [Step.of(0.0, truth.predict(features(SHAPE, 2, r, t, a, k, r)), [], rows=r, slots=t,
                     logit_rows=r) for r, t, a, k in shapes]
    for s, (_, t, a, k) in zip(steps, shapes):
        s.prefill_tokens, s.attended, s.kv_read = t, a, k
    cost = StepCost.fit_steps(steps, SHAPE, 2, truth)
    mixed = features(SHAPE, 2, rows=8, tokens=47, attended=7 * 121 + 820, kv_read=7 * 120,
                     logit_rows=8)
    assert cost.predict(mixed) == pytest.approx(truth.predict(mixed), rel=1e-3)


def test_the_host_time_between_steps_counts_unless_a_request_arrives_in_it():
    steps = [Step(0.0, 1.0, 1, 1, 0, 1, 1, 0, 1), Step(1.5, 2.0, 1, 1, 0, 1, 1, 0, 1),
             Step(3.0, 4.0, 1, 1, 0, 1, 1, 0, 1)]
    assert [s.seconds for s in with_host_time(steps, [0.0, 2.5])] == [1.5, 0.5, 1.0]


# on the CPU's sweep of single runs the TTFT p50 of one unfitted run, at the knee of its curve, is
# off by more than 30% (1 of 11); against the medians of repeated runs, none is. Named, so that a
# second miss fails (an xfail would have absorbed it, and any other error too)
KNEE = "paged, gather, blocks of 16, B=8, chat, n=24, 4 req/s"


@pytest.mark.parametrize("name,metric,bound,known_misses", [
    ("cpu/simulator_cpu.json", "output_tokens_per_s", 0.15, set()),
    ("cpu/simulator_cpu.json", "ttft_p50_s", 0.30, {KNEE}),
    ("simulator_nvidia-h200.json", "output_tokens_per_s", 0.15, set()),
    ("simulator_nvidia-h200.json", "ttft_p50_s", 0.30, set()),
    ("cpu/simulator_cpu_repeats.json", "output_tokens_per_s", 0.15, set()),
    ("cpu/simulator_cpu_repeats.json", "ttft_p50_s", 0.30, set()),
    ("simulator_nvidia-h200_repeats.json", "output_tokens_per_s", 0.15, set()),
    ("simulator_nvidia-h200_repeats.json", "ttft_p50_s", 0.30, set())])
def test_the_stored_validation_predicts_runs_it_was_not_fitted_on(name, metric, bound,
                                                                  known_misses):
    """Throughput within 15% and TTFT p50 within 30% on every run not fitted on, but the misses
    named; on the CPU these include other batch sizes and other arrival rates than the fitted
    runs'. A sweep of repeated runs is held to each point's median (``simulator_validation
    --medians``)."""
    v = load_result(name)
    points = v.get("medians", v["rows"])
    assert "medians" in v or "repeats" not in name
    fitted = [r for r in points if r["in_fit"]]
    predicted = [r for r in points if not r["in_fit"]]
    other = {k: {r[k] for r in predicted} - {r[k] for r in fitted}
             for k in ("max_batch", "arrival_rate")}
    assert fitted and other["max_batch"], "no run at another batch size"
    assert other["arrival_rate"] or name == "simulator_nvidia-h200.json", "no run at another rate"
    missed = [(r["run"], round(r[metric]["error"], 3)) for r in predicted
              if abs(r[metric]["error"]) > bound]
    assert {run for run, _ in missed} == known_misses, missed


@pytest.mark.parametrize("name,folder", [("cpu/simulator_cpu.json", "cpu/"),
                                         ("cpu/simulator_cpu_repeats.json", "cpu/"),
                                         ("simulator_nvidia-h200_repeats.json", "")])
def test_the_stored_sweep_validation_is_what_the_code_computes_from_the_stored_sweep(name, folder):
    """The stored errors are today's model's: fitted again to the same runs of the stored sweep,
    it simulates every run as stored."""
    from course_lib.measure.simulator import runs_in, validate
    v = load_result(name)
    runs = runs_in(load_result(f"{folder}{Path(v['fit_files'][0]).name}"))
    stored = {r["run"]: r for r in v["rows"]}
    assert set(stored) == {run_name(r) for r in runs}
    book = CostBook.fit([r for r in runs if stored[run_name(r)]["in_fit"]])
    for r in runs:
        got, want = validate(book, r), stored[run_name(r)]
        for k in ("output_tokens_per_s", "ttft_p50_s"):
            assert got[k]["simulated"] == pytest.approx(want[k]["simulated"]), (got["run"], k)


def test_medians_compare_each_point_with_the_median_of_its_repeats():
    """``simulator_validation --medians``: repeats of one point become one row whose measured
    value is their median (an odd one out does not decide it) and whose error is against it."""
    from bench.simulator_validation import medians

    def row(run, measured, in_fit=False):
        return {"run": run, "in_fit": in_fit, "max_batch": 8, "arrival_rate": 4.0,
                "ttft_p50_s": {"simulated": 0.6, "measured": measured,
                               "error": 0.6 / measured - 1}}
    rows = [row("a", 0.5), row("a", 0.4), row("a", 3.0), row("b", 0.6, in_fit=True)]
    got = {(r["run"], r["in_fit"]): r for r in medians(rows)}
    assert got[("a", False)]["repeats"] == 3 and got[("b", True)]["repeats"] == 1
    assert got[("a", False)]["ttft_p50_s"]["measured"] == 0.5
    assert got[("a", False)]["ttft_p50_s"]["error"] == pytest.approx(0.2)
    assert got[("b", True)]["ttft_p50_s"]["error"] == pytest.approx(0.0)
