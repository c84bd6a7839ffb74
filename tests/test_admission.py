"""SLO admission control, goodput and queue depth. The engine runs on the simulator with a known
step cost, so the tests are exact and fast: what the controller predicts is what happens."""
import json

import pytest
from test_simulator import SHAPE, flat_cost

from course_lib import bench
from course_lib.engines.policies import SLO, AdmissionController, StepTimeModel
from course_lib.measure.costmodel import StepCost
from course_lib.measure.metrics import RequestRecord, RunLog, Step, goodput, queue_depth, summarize
from course_lib.measure.simulator import CostBook, simulate
from course_lib.requests import Request, poisson_arrivals

COST = flat_cost(0.01, per_row=0.002)          # a step: 10 ms + 2 ms per sequence in it


def workload(n=60, rate=200.0):
    reqs = [Request(f"r{i}", [3] * 20, max_new_tokens=10 + (i * 7) % 20) for i in range(n)]
    return poisson_arrivals(reqs, rate, seed=0)


def run(slo=None, admission=False, max_batch=32, **kw):
    options = {"block_size": 16}
    if admission:
        options.update(slo=slo, step_cost=COST)
    eng, log = simulate("continuous", kw.pop("reqs", workload()), COST, SHAPE, 2,
                        max_batch=max_batch, **options)
    return log


@pytest.mark.parametrize("ttft,tpot", [(0, None), (None, -1.0), (0.0, 0.05)])
def test_an_slo_that_cannot_work_is_named(ttft, tpot):
    with pytest.raises(ValueError, match="TTFT" if ttft is not None and ttft <= 0 else "TPOT"):
        SLO(ttft, tpot)


def test_admission_refuses_what_would_be_late_and_raises_goodput():
    slo = SLO(ttft_s=0.3)
    without, with_ = run(), run(slo, admission=True)
    g0, g1 = goodput(without, slo), goodput(with_, slo)
    assert g1["goodput_rps"] > g0["goodput_rps"]
    refused = [r for r in with_.requests if r.finish_reason == "refused"]
    assert refused and all("TTFT target of 0.3 s" in r.error for r in refused)
    served = [r for r in with_.requests if r.finish_reason == "length"]
    assert all(r.ttft_s <= 0.3 + 1e-9 for r in served)                 # the prediction is exact
    assert len(served) + len(refused) == 60                           # none lost


def test_a_tpot_target_caps_the_batch():
    # a decode step of k sequences takes 10 + 2k ms: a 30 ms target admits at most 10 of them
    log = run(SLO(tpot_s=0.030), admission=True)
    decodes = [s for s in log.steps if s.decode_tokens and not s.prefill_tokens]
    assert max(s.rows for s in decodes) == 10          # capped at 10, and the cap is reached
    assert all(r.tpot_s <= 0.030 + 1e-9 for r in log.requests if r.finish_reason == "length")
    assert all(r.finish_reason == "length" for r in log.requests)      # queued, never refused


def test_the_online_model_learns_the_step_cost_without_a_prior():
    slo = SLO(ttft_s=0.3)
    eng, log = simulate("continuous", workload(), COST, SHAPE, 2, max_batch=32, block_size=16,
                        slo=slo)
    assert eng.admission.model.cost is not None
    assert eng.admission.model.cost.coef["per_row"] == pytest.approx(0.002, rel=1e-6)
    assert goodput(log, slo)["goodput_rps"] > goodput(run(), slo)["goodput_rps"]


def test_the_online_model_keeps_refitting_past_its_window(monkeypatch):
    fitted = []                  # the number of steps each fit saw
    monkeypatch.setattr(StepCost, "fit_steps",
                        classmethod(lambda cls, steps, *a: fitted.append(len(steps)) or COST))
    model, log = StepTimeModel(SHAPE, 2), []
    for _ in range(1200):        # the engine calls update after each step, with its whole log
        log.append(None)
        model.update(log)
    assert fitted[0] == model.min_steps and max(fitted) == model.window
    assert len(fitted) == 1 + (1200 - model.min_steps) // model.refit_every


def test_decide_explains_itself():
    ctl = AdmissionController(SLO(ttft_s=0.1, tpot_s=0.02), StepTimeModel(SHAPE, 2, prior=COST))
    assert ctl.decide(20, 0.0, [30] * 3) == ("admit", "")
    verdict, why = ctl.decide(20, 0.095, [30] * 3)
    assert verdict == "refuse" and "waited 0.095 s" in why
    verdict, why = ctl.decide(20, 0.0, [30] * 5)          # 10 + 2 x 6 = 22 ms > 20 ms
    assert verdict == "queue" and "TPOT target of 0.02 s" in why


def test_goodput_and_queue_depth_from_records():
    recs = [RequestRecord("a", 0.0, 3, [1, 2], [0.1, 0.2], 0.2, "length"),
            RequestRecord("b", 0.0, 3, [1, 2], [0.5, 0.9], 0.9, "length"),
            RequestRecord("c", 0.3, 3, finish_s=0.6, finish_reason="refused")]
    steps = [Step(0.0, 0.1, 1, 3, 3, 0, 6, 0, 1, active=["a"]),
             Step(0.4, 0.5, 1, 3, 3, 0, 6, 0, 1, active=["b"])]
    log = RunLog("x", recs, steps, 1.0)
    g = goodput(log, SLO(ttft_s=0.2))
    assert (g["met"], g["attainment"]) == (1, pytest.approx(1 / 3))
    assert g["goodput_rps"] == pytest.approx(1 / 0.9)
    times, depth = queue_depth(log)
    assert max(depth) == 2                   # b waits from 0.0 to 0.4; c from 0.3 to its refusal
    assert depth[-1] == 0
    assert summarize(log, slo=SLO(ttft_s=0.2))["queue_depth_max"] == 2


def test_bench_admission_needs_an_slo_and_reports_goodput(tmp_path):
    cost = tmp_path / "cost.json"
    CostBook({"gather": COST}).save(cost)
    with pytest.raises(ValueError, match="needs an SLO"):
        bench.bench("continuous", admission=True, simulate=str(cost))
    out = tmp_path / "r.json"
    bench.main(["--engine", "continuous", "--model", "llama-1b-dummy", "--dtype", "bfloat16",
                "--workload", "anyscale:prompt_len=32,cap=32,mean=16", "--n", "40",
                "--max-batch", "16", "--block-size", "16", "--arrival-rate", "300",
                "--ttft-slo", "0.2", "--admission",
                "--simulate", str(cost), "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["engine_options"]["slo"] == {"ttft_s": 0.2, "tpot_s": None}
    assert r["metrics"]["slo"]["ttft_slo_s"] == 0.2 and r["metrics"]["queue_depth_max"] >= 1


def test_the_curve_saturates_and_the_plots_draw():
    import matplotlib
    matplotlib.use("Agg")
    from course_lib.lab import plots
    from course_lib.measure.tradeoffs import simulated, sweep
    reqs = [Request(f"r{i}", [3] * 20, max_new_tokens=16) for i in range(40)]
    run = simulated(CostBook({"gather": COST}), SHAPE, 2, reqs, block_size=16)
    rows = sweep(run, [5, 20, 80, 320], [2, 16])
    by = {(r["max_batch"], r["rate"]): r for r in rows}
    assert by[16, 20]["tokens_per_s"] > by[16, 5]["tokens_per_s"]          # more load, more output
    assert by[2, 320]["ttft_p50"] > 5 * by[2, 5]["ttft_p50"]              # past capacity: a queue
    assert by[16, 320]["tokens_per_s"] > by[2, 320]["tokens_per_s"]       # a bigger batch: more
    slo = SLO(ttft_s=0.3)
    g = sweep(run, [20, 320], [16], slo=slo) + sweep(run, [20, 320], [16], slo=slo, admission=True)
    for r in g:                                   # on time: the attained share of the requests
        assert 0 <= r["on_time"] <= r["served"] and r["on_time"] == round(r["attainment"] * 40)
    free, gated = g[1], g[3]                      # at 320 req/s, without and with admission
    assert gated["served"] - gated["on_time"] < free["served"] - free["on_time"]
    # the plots draw these numbers: a curve per max_batch through the rates, the measured point
    ax = plots.throughput_latency(rows, measured=rows[:1])
    want = [[(by[b, r]["tokens_per_s"], by[b, r]["tpot_p50"]) for r in (5, 20, 80, 320)]
            for b in (2, 16)] + [[(rows[0]["tokens_per_s"], rows[0]["tpot_p50"])]]
    assert [list(zip(line.get_xdata(), line.get_ydata())) for line in ax.lines] == want
    ax = plots.goodput_vs_load(g)
    assert [list(line.get_ydata()) for line in ax.lines] == [
        [r["goodput_rps"] for r in g[:2]], [r["goodput_rps"] for r in g[2:]]]
    log = run(320, 2)
    ax = plots.queue_depth({"x": log})
    times, depth = queue_depth(log)
    assert len(ax.lines) == 1 and list(ax.lines[0].get_ydata()) == list(depth) and max(depth) > 1
    served = sum(r.finish_reason in ("eos", "length") for r in log.requests)
    for ax in plots.latency_distributions({"x": log}):     # one CDF each, up to every request
        cdf = [line for line in ax.lines if len(line.get_xdata()) > 2]
        assert len(cdf) == 1 and len(cdf[0].get_xdata()) == served == 40
        assert cdf[0].get_ydata()[-1] == 1.0
