"""The chapter-01 instruments: timed steps, the sweep, the seed's arithmetic, plots, widgets."""
import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from course_lib.lab import plots
from course_lib.lab.nbtools import stored_results  # noqa: E402
from course_lib.measure import roofline  # noqa: E402
from course_lib.model.llama import Llama  # noqa: E402

PEAKS = roofline.Peaks("test device", "float32", bandwidth=1e10, flops=1e11, method="made up")


@pytest.fixture(scope="module")
def tiny_model(tiny):
    return Llama.from_hf(tiny.model)


def test_the_seeds_example_with_its_assumptions():
    """7B params in 16-bit (14 GB) on an A100's datasheet: the seed's "~1%" and "~8%"."""
    u1 = roofline.memory_bound_utilisation(7e9, 2, 1, bandwidth=2.0e12, flops=312e12)
    u8 = roofline.memory_bound_utilisation(7e9, 2, 8, bandwidth=2.0e12, flops=312e12)
    assert u1["step_s"] == pytest.approx(7e-3)
    assert u1["compute_utilisation"] == pytest.approx(0.00641, rel=1e-3)
    assert u8["compute_utilisation"] == pytest.approx(8 * u1["compute_utilisation"])
    assert u8["intensity"] == pytest.approx(8.0)


def test_sweep_rows_are_consistent(tiny_model):
    rows = roofline.batch_sweep(tiny_model, PEAKS, (1, 4), context=16, prefill_tokens=32, repeat=2)
    assert [(r["kind"], r["batch"]) for r in rows] == [("decode", 1), ("decode", 4), ("prefill", 1)]
    for r in rows:
        assert r["step_s"] > 0 and r["mode"] == "eager"
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["new_tokens"] / r["step_s"])
        assert r["mbu"] == pytest.approx(r["bytes"] / r["step_s"] / PEAKS.bandwidth)
        assert r["mfu"] == pytest.approx(r["flops"] / r["step_s"] / PEAKS.flops)
    # a decode step's FLOPs grow with the batch; its bytes are mostly the weights, read once
    d1, d4, pre = rows
    assert d4["flops"] > 3.9 * d1["flops"] and d4["bytes"] < 2 * d1["bytes"]
    assert d4["intensity"] > 3.5 * d1["intensity"] and pre["new_tokens"] == 32


def test_graph_timing_needs_cuda(tiny_model):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="CUDA"):
        roofline.time_step(tiny_model, 1, 4, graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_timing_runs_on_cuda(tiny):
    m = Llama.from_hf(tiny.model.to("cuda"))
    assert roofline.time_step(m, 4, 32, graph=True) > 0


def test_plots_draw_every_point(tiny_model):
    rows = roofline.batch_sweep(tiny_model, PEAKS, (1, 2), context=8, prefill_tokens=16, repeat=1)
    ax = plots.roofline(PEAKS, rows)
    assert sum(len(c.get_offsets()) for c in ax.collections) == 3
    left, right = plots.step_time_vs_batch(plots.by_mode(rows, "tiny"))
    assert len(left.lines) == 1 and list(left.lines[0].get_xdata()) == [1, 2]
    bars = plots.utilisation_bars(rows, batches=(1, 2))
    assert len(bars.patches) == 4
    matplotlib.pyplot.close("all")


def test_batch_size_explorer_runs_nothing_until_clicked(tiny_model, monkeypatch):
    from course_lib.lab import widgets
    calls = []
    monkeypatch.setattr(roofline, "time_step", lambda *a, **k: calls.append(a) or 0.01)
    ui = widgets.batch_size_explorer(tiny_model, PEAKS, context=8)
    assert calls == []
    # and a click times the chosen batch and each smaller power of two, once
    monkeypatch.setattr(widgets, "clear_output", lambda wait=False: None)
    ui.children[0].value = 2                                  # log2(batch)
    ui.children[-2].click()
    assert [a[1] for a in calls] == [1, 2, 4]
    ui.children[-2].click()
    assert len(calls) == 3
    matplotlib.pyplot.close("all")


def test_stored_gpu_results_carry_their_provenance():
    runs = stored_results("ch01_batch_sweep") + stored_results("foundation_")
    assert runs, "bench/results/ should hold the GPU runs the notebooks show"
    for r in runs:
        assert r["device"]["device"] and r["device"]["bandwidth"] > 0
        assert r["versions"]["torch"] and r["versions"]["course_lib_commit"]
        assert r["command"].startswith("python")


def test_floor_by_step_bounds_every_kind_of_step_of_the_stored_ladder():
    """bench floor_by_step on the stored chapter 09 ladder: every step is counted once, and each
    kind of step took longer than its floor (a floor above the time would not be a floor)."""
    from bench.floor_by_step import by_kind
    from course_lib.lab.nbtools import load_result
    result = load_result("ladder09_anyscale_llama-1b-dummy_nvidia-h200.json")
    rung = "fast:kv_memory_mib=16384,max_num_batched_tokens=16384"
    rows = by_kind(result, rung)
    run = next(r for r in result["runs"] if r["rung"] == rung)
    assert sum(r["steps"] for r in rows.values()) == len(run["steps"])
    assert all(0 < r["floor_s"] < r["seconds"] for r in rows.values() if r["steps"])
    assert rows["mixed"]["steps"] > 0 and rows["decode, 1-127 rows"]["steps"] > 0


def test_host_overlap_times_every_step_of_a_real_run(tmp_path):
    """bench host_overlap wraps the engine's launch and complete: every step of the run gets a
    record with its launch, wait and retire times, and the stored summary counts them all."""
    import json

    from bench.host_overlap import main
    main(["--model", "tiny", "--device", "cpu", "--dtype", "float32", "--n", "6",
          "--workload", "anyscale:prompt_len=16,cap=8,mean=4", "--rung",
          "fast:kv_memory_mib=16,max_num_batched_tokens=64", "--out", str(tmp_path)])
    result = json.loads(next(tmp_path.glob("host_overlap_tiny_cpu.json")).read_text())
    steps = result["steps"]
    assert steps and all(s["launch_ms"] > 0 and s["wait_ms"] >= 0 and s["retire_ms"] > 0
                         for s in steps)
    assert {s["kind"] for s in steps} == {"packed", "decode"}
    assert sum(r["steps"] for r in result["summary"]) == len(steps)


def test_every_bench_experiment_imports_and_parses_its_arguments(capsys):
    """Each experiment ``python -m bench`` lists imports here (most run only on a GPU) and
    answers ``-h`` with its usage: a renamed library function fails here, not on a GPU machine."""
    import importlib

    from bench.__main__ import EXPERIMENTS
    for name in EXPERIMENTS:
        module = importlib.import_module(f"bench.{name}")
        if name == "host_time":           # reads sys.argv itself
            continue
        with pytest.raises(SystemExit) as done:
            module.main(["-h"])
        assert done.value.code == 0, name
        assert "usage" in capsys.readouterr().out, name


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter: machines without a GPU")
def test_the_l2_touch_kernel_reads_every_element_up_to_its_cap():
    """``bench l2_prefetch``'s touch kernel, in Triton's interpreter: its programs' sums add up to
    the sum of all the weights, or of the first ``cap_bytes`` of them."""
    import os
    import subprocess
    import sys
    code = ("import torch; from bench.l2_prefetch import touch; torch.manual_seed(0); "
            "w = torch.randn(1000, 37).to(torch.bfloat16); flat = w.float().reshape(-1); "
            "s = torch.zeros(3); touch(w, s, 3, block=64); a = (s.sum() - flat.sum()).abs(); "
            "s.zero_(); touch(w, s, 3, cap_bytes=1000, block=64); "
            "b = (s.sum() - flat[:500].sum()).abs(); c = (s.sum() - flat.sum()).abs(); "
            "print(float(a), float(b), float(c))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, TRITON_INTERPRET="1"))
    assert r.returncode == 0, r.stderr
    whole, capped, capped_against_whole = map(float, r.stdout.split())
    assert whole < 1e-2 and capped < 1e-2 and capped_against_whole > 1


def test_the_mlp_in_chunks_of_tokens_gives_the_whole_mlp():
    """``bench mlp_chunks`` times the MLP in row chunks: every chunk size, a divisor or not of the
    rows, writes every row as the whole MLP would (on the CPU with the reference SwiGLU)."""
    from bench.mlp_chunks import mlp
    from course_lib.model.llama import silu_mul
    torch.manual_seed(0)
    weights = [(torch.randn(2 * 24, 16) * 0.2, torch.randn(16, 24) * 0.2) for _ in range(2)]
    x = torch.randn(37, 16)
    whole = torch.full((37, 16), float("nan"))
    mlp(x, weights, whole, None, silu_mul)
    # the layers are not chained: what stays is the last layer's SwiGLU MLP of x, worked out here
    w_gate_up, w_down = weights[-1]
    gate, up = (x @ w_gate_up.t()).chunk(2, dim=-1)
    torch.testing.assert_close(whole, silu_mul(gate, up) @ w_down.t(), rtol=1e-5, atol=1e-5)
    for chunk in (1, 8, 10, 36, 37, 64):
        out = torch.full((37, 16), float("nan"))
        mlp(x, weights, out, chunk, silu_mul)
        torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-5)
