"""Chapter 09's fast path on the CPU: sampling, the decode buffers a CUDA graph owns (eager here),
the engine's kernel path, the physical floor, the named ladder rungs; and on a GPU, graphs
against eager launches."""
import gzip
import importlib.util
import json
from collections import Counter

import pytest
import torch
from fakes import LOADED, FakeLlama

from bench.host_overlap import gpu_waits
from course_lib.engines import make_engine
from course_lib.engines.block_manager import BlockManager
from course_lib.kernels.cuda_graphs import DecodeGraphs, batch_buckets
from course_lib.lab import plots, widgets
from course_lib.lab.nbtools import RESULTS, load_result
from course_lib.measure.ladder import label, ordered, parse_rung, run_ladder, table, time_split
from course_lib.measure.metrics import RunLog, Step, summarize
from course_lib.measure.roofline import Peaks, attended_pairs, step_work, workload_floor
from course_lib.model import models
from course_lib.model.llama import LlamaShape
from course_lib.model.sampling import sample
from course_lib.requests import Request, load_workload


def test_greedy_sampling_is_argmax_and_temperature_follows_the_softmax():
    logits = torch.randn(6, 50)
    assert torch.equal(sample(logits), logits.argmax(-1))
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    g = torch.Generator().manual_seed(0)
    draws = sample(probs.log().expand(20000, 4), temperature=1.0, generator=g)
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(freq, probs, atol=0.015), freq
    hot = sample(probs.log().expand(20000, 4), temperature=0.25, generator=g)   # sharper: p^4
    want = (probs.log() / 0.25).softmax(0)
    assert torch.allclose(torch.bincount(hot, minlength=4).float() / len(hot), want, atol=0.015)
    with pytest.raises(ValueError, match="temperature"):
        sample(logits, -1.0)


def test_batch_buckets_cover_every_batch_with_little_padding():
    assert batch_buckets(512)[:7] == [1, 2, 4, 8, 16, 32, 64] and batch_buckets(512)[-1] == 512
    assert batch_buckets(100) == [1, 2, 4, 8, 16, 32, 64, 96, 100]
    assert batch_buckets(1) == [1]


def test_the_output_head_runs_on_a_few_row_counts_on_cuda(monkeypatch):
    """On CUDA a packed step's head computes a power of two of rows (at least 16), every such
    count met once in precompile; elsewhere exactly the sampled rows. The padded rows change no
    token (the engine on the fake model, with CUDA's rule)."""
    from types import SimpleNamespace

    from course_lib.engines.model_runner import ModelRunner

    def rows(device, n, head_rows=ModelRunner.head_rows):
        return head_rows(SimpleNamespace(model=SimpleNamespace(device=torch.device(device))), n)
    assert [rows("cuda", n) for n in (1, 16, 17, 250, 486, 512)] == [16, 16, 32, 256, 512, 512]
    assert all(rows("cuda", n) >= n for n in range(1, 2000))
    assert [rows("cpu", n) for n in (1, 17, 486)] == [1, 17, 486]

    class Counting(FakeLlama):
        def logits(self, hidden, float32=True):
            seen.append(hidden.shape[0])
            return super().logits(hidden, float32)
    reqs = [Request(f"r{i}", [7] * (2 + 5 * i) + [4 + i], max_new_tokens=20) for i in range(7)]
    seen, answers = [], {}
    for rule in ("cpu", "cuda"):
        monkeypatch.setattr(ModelRunner, "head_rows", lambda self, n, d=rule: rows(d, n))
        eng = make_engine("continuous", LOADED, model=Counting(), max_batch=40, block_size=2,
                          attention="gather", max_num_batched_tokens=16)
        seen.clear()
        answers[rule] = [r.output_tokens for r in eng.run(reqs).requests]
        packed = list(seen)
        seen.clear()
        monkeypatch.setattr(eng.runner, "attention_cls", SimpleNamespace(
            precompile=lambda *args: None))
        eng.runner.precompile(16)
        if rule == "cuda":
            assert packed and set(packed) <= set(seen) == {16, 32, 64}, (packed, seen)
        else:
            assert len(set(packed)) > 1 and not set(packed) <= {16, 32, 64}, packed
    assert answers["cuda"] == answers["cpu"]


def test_decode_buffers_give_the_reference_tokens(tiny):
    """Decode steps through the fixed buffers (pad rows included) = the gather reference."""
    eng = make_engine("continuous", tiny, max_batch=3, block_size=4, num_blocks=40,
                      attention="kernel")
    reqs = [Request(f"r{i}", list(range(5, 9 + 3 * i)), max_new_tokens=5) for i in range(3)]
    ref = make_engine("continuous", tiny, max_batch=3, block_size=4, num_blocks=40).run(reqs)
    log = eng.run(reqs)
    assert [r.output_tokens for r in log.requests] == [r.output_tokens for r in ref.requests]
    graphs = eng.runner.decoder
    assert isinstance(graphs, DecodeGraphs) and not graphs.graphs       # eager on the CPU
    decode = [s for s in log.steps if s.kind == "decode"]
    assert decode and all(s.slots == graphs.bucket(s.rows) for s in decode)   # pad rows counted
    # a second run reuses the cache and the buffers, emptied
    cache = eng.cache
    assert [r.output_tokens for r in eng.run(reqs).requests] == \
        [r.output_tokens for r in ref.requests]
    assert eng.cache is cache and eng.runner.decoder is graphs and cache.blocks.n_free == 40
    with pytest.raises(ValueError, match="1 to 3 sequences"):
        graphs.step([])


def test_decode_buffers_rewrite_only_what_changed_and_still_hold_every_table(tiny):
    """The buffers keep each row's table from step to step and write only new blocks: after
    growth, a reordered batch, a new sequence in a row, a smaller batch and a preempted (new
    table) sequence, every row must hold exactly what a fresh fill writes."""
    from course_lib.model.kv_cache import PagedKVCache
    from course_lib.model.llama import Llama
    model = Llama.from_hf(tiny.model)
    cache = PagedKVCache(model.shape, BlockManager(200, 4), model.dtype)
    kept = DecodeGraphs(model, cache, 8, 12)
    for sid in "abcde":
        cache.grow(sid, 5)

    def rows(ids):
        return [(7, cache.lengths[s] - 1, cache.tables[s], -1) for s in ids]

    def valid(g, n):
        B = g.buckets[-1]
        buf = g.np[:5 * B].reshape(5, B)[:, :n].copy()
        tables = g.np[5 * B:].reshape(B, g.max_blocks)
        return buf, [tables[i, :len(t)].tolist() for i, (_, _, t, _) in enumerate(g_rows)]

    for ids in ("abc", "abc", "cab", "cabd", "ed", "abcde"):
        for sid in ids:
            cache.grow(sid, 3)                    # blocks of 4: some steps add a block
        if ids == "ed":
            cache.release("a")                    # preempted: a new table when it comes back
            cache.grow("a", 9)
        g_rows = rows(ids)
        kept.fill(g_rows)
        fresh = DecodeGraphs(model, cache, 8, 12)
        fresh.fill(g_rows)
        got, want = valid(kept, len(ids)), valid(fresh, len(ids))
        assert (got[0] == want[0]).all() and got[1] == want[1] == [t for _, _, t, _ in g_rows], ids


def test_fast_path_schedules_like_the_reference_on_the_fake_model():
    reqs = [Request(f"r{i}", [7] * (3 + i) + [8 + i], max_new_tokens=12) for i in range(6)]
    outs = {}
    for attention in ("gather", "kernel"):
        e = make_engine("continuous", LOADED, model=FakeLlama(), max_batch=4, block_size=2,
                        num_blocks=12, attention=attention)
        log = e.run(reqs)
        outs[attention] = ([r.output_tokens for r in log.requests],
                           [(s.prefill_tokens, s.decode_tokens) for s in log.steps], e.preemptions)
    assert outs["gather"] == outs["kernel"] and outs["kernel"][2] > 0


@pytest.mark.parametrize("attention", ["gather", "kernel"])
def test_overlapped_steps_give_the_answers_of_waited_ones(attention):
    """With ``overlap`` the host schedules and launches step k+1 before it has read step k's
    tokens (the next step takes them from the device). The fake model answers each token with
    the one below it, so a token taken from the wrong place changes the answer. The answers must
    not change: with EOS learnt a step late, sequences preempted while their token is in flight,
    chunked prefill, and requests that arrive later."""
    n_out = [3 + 2 * i for i in range(8)]              # each answer ends in EOS
    reqs = [Request(f"r{i}", [7] * (3 + 3 * i) + [n + 2], max_new_tokens=n + 1,
                    arrival_s=0.0 if i < 6 else 0.02) for i, n in enumerate(n_out)]
    reqs.append(Request("capped", [7, 7, 30], max_new_tokens=5))      # stops on length
    want = [list(range(n + 1, 1, -1)) for n in n_out] + [[29, 28, 27, 26, 25]]
    runs = {}
    for overlap in (False, True):
        e = make_engine("continuous", LOADED, model=FakeLlama(), max_batch=5, block_size=2,
                        num_blocks=24, max_num_batched_tokens=8, attention=attention,
                        overlap=overlap)
        order = []
        for obj, name in ((e.runner, "launch"), (e, "complete")):
            method = getattr(obj, name)
            setattr(obj, name, lambda *a, _m=method, _n=name: (order.append(_n[0]), _m(*a))[1])
        log = e.run(reqs)
        assert [r.output_tokens for r in log.requests] == want, overlap
        assert [r.finish_reason for r in log.requests] == ["eos"] * 8 + ["length"]
        assert e.preemptions > 0 and e.cache.blocks.n_free == 24 and not e.cache.tables
        assert all(a.end_s <= b.start_s for a, b in zip(log.steps, log.steps[1:]))   # back to back
        runs[overlap] = "".join(order)
    assert runs[False] == "lc" * (len(runs[False]) // 2)          # each step waited for
    # one step ahead: a step is launched while the one before it is still unread
    ahead, depth = 0, 0
    for x in runs[True]:
        depth += 1 if x == "l" else -1
        assert 0 <= depth <= 2
        ahead += depth == 2
    assert ahead > 0.8 * runs[True].count("l")


def test_overlap_keeps_the_real_model_s_greedy_answers(tiny):
    reqs = load_workload("anyscale:prompt_len=32,cap=32,mean=8", n=10,
                         vocab_size=tiny.config.vocab_size)
    outs = []
    for overlap in (False, True):
        e = make_engine("continuous", tiny, max_batch=6, block_size=8, num_blocks=20,
                        max_num_batched_tokens=48, attention="kernel", overlap=overlap)
        log = e.run(reqs)
        outs.append([r.output_tokens for r in log.requests])
        assert e.preemptions > 0
    assert outs[0] == outs[1]


def test_a_watermark_keeps_room_to_grow_and_preempts_less():
    reqs = [Request(f"r{i}", [7] * 20 + [30], max_new_tokens=40) for i in range(12)]
    runs = {}
    for wm in (0.0, 0.25):
        e = make_engine("continuous", LOADED, model=FakeLlama(), max_batch=12, block_size=4,
                        num_blocks=60, watermark=wm)
        log = e.run(reqs)
        runs[wm] = (e.preemptions, [r.output_tokens for r in log.requests],
                    max(s.rows for s in log.steps))
    assert runs[0.0][0] > 0 and runs[0.25][0] < runs[0.0][0]       # fewer prompts recomputed
    assert runs[0.0][1] == runs[0.25][1]                            # the same answers
    assert parse_rung("fast:watermark=0.05", {"rows": 1, "big": 8, "max_num_batched_tokens": 64,
                                             "max_batch": 4})[3][
        "watermark"] == 0.05


def test_a_victim_already_in_the_step_is_taken_out_of_it(tiny):
    """Preemption during the decode pass may pick a sequence scheduled earlier in the same pass
    (the running order changes once sequences are readmitted): it must leave the step."""
    reqs = load_workload("anyscale:prompt_len=32,cap=32,mean=8", n=12,
                         vocab_size=tiny.config.vocab_size)
    e = make_engine("continuous", tiny, max_batch=8, block_size=16, num_blocks=12)
    log = e.run(reqs)
    assert e.preemptions > 0
    assert {r.finish_reason for r in log.requests} == {"length"}
    assert all(len(r.output_tokens) == q.max_new_tokens for r, q in zip(log.requests, reqs))
    assert e.cache.blocks.n_free == 12 and not e.cache.tables


@pytest.mark.parametrize("option,value,message", [("cuda_graphs", True, "cuda_graphs needs a CUDA"),
                                                  ("temperature", -0.5, "temperature"),
                                                  ("watermark", 1.0, "watermark"),
                                                  ("fused", True, "fused needs a CUDA")])
def test_fast_path_settings_that_cannot_work_are_named(tiny, option, value, message):
    with pytest.raises(ValueError, match=message):
        make_engine("continuous", tiny, block_size=16, **{option: value})


def test_the_physical_floor_adds_prefill_flops_and_decode_bytes():
    shape = LlamaShape(100, 64, 128, 2, 4, 2, 16, 1e4, 1e-5, 0, 4096)
    peaks = Peaks("test", "float32", bandwidth=1e9, flops=1e12, method="given")
    f = workload_floor(shape, 4, [10, 20], [3, 1], peaks)
    pre = sum(step_work(shape, 4, n, attended_pairs(0, n), 0, 1).flops for n in (10, 20)) / 1e12
    # only the first sequence decodes
    steps = [step_work(shape, 4, 1, 11, 10, 1), step_work(shape, 4, 1, 12, 11, 1)]
    dec = sum(max(w.bytes / 1e9, w.flops / 1e12) for w in steps)
    assert f["prefill_s"] == pytest.approx(pre) and f["decode_s"] == pytest.approx(dec)
    assert f["output_tokens_per_s"] == pytest.approx(4 / (pre + dec))


def test_big_decode_steps_are_summarised_apart():
    shape = LlamaShape(100, 64, 128, 2, 4, 2, 16, 1e4, 1e-5, 0, 4096)
    peaks = Peaks("test", "float32", bandwidth=1e9, flops=1e12, method="given")
    steps = [Step(0, 1, 128, 128, 0, 128, 128 * 50, 128 * 49, 128),
             Step(1, 2, 4, 4, 0, 4, 200, 196, 4), Step(2, 4, 200, 300, 100, 200, 0, 0, 200)]
    m = summarize(RunLog("x", [], steps, 4.0), shape, 4, peaks)
    w = step_work(shape, 4, 128, 128 * 50, 128 * 49, 128)
    assert m["decode_b128"]["steps"] == 1
    assert m["decode_b128"]["mbu"] == pytest.approx(w.bytes / 1e9)


def test_rungs_are_parsed_with_their_settings():
    settings = {"rows": 1000, "big": 512, "max_num_batched_tokens": 2048, "max_batch": 64}
    assert parse_rung("static", settings) == ("static", "static", 64, {})
    name, engine, batch, opts = parse_rung("fast:kv_memory_mib=2,max_num_batched_tokens=8192",
                                           settings)
    assert (engine, batch) == ("fast", 512)
    assert opts == {"block_size": 16, "attention": "kernel", "cuda_graphs": True, "fused": True,
                    "overlap": True, "watermark": 0.0, "kv_memory_bytes": 2 * 2**20,
                    "max_num_batched_tokens": 8192}
    _, engine, batch, opts = parse_rung("chunked", settings)       # the rung's budget, said
    assert (engine, batch, opts["max_num_batched_tokens"], opts["kv_memory_bytes"]) == (
        "chunked", 512, 2048, 1000)
    _, engine, _, opts = parse_rung("paged", settings)           # whole prompts: no budget
    assert engine == "paged" and opts["max_num_batched_tokens"] is None


def test_a_ladder_run_names_its_rungs_keeps_going_and_has_a_floor(tiny):
    r = run_ladder(tiny, "tiny", "anyscale:prompt_len=16,cap=8,mean=4",
                   ["static", "fast", "fast:cuda_graphs=0,fused=0"], n=6, max_batch=2,
                   big_batch=4, max_num_batched_tokens=32, dtype="float32", device="cpu",
                   progress=False, echo=lambda *a: None)
    assert [x["rung"] for x in r["runs"]] == ["static", "fast", "fast:cuda_graphs=0,fused=0"]
    assert "cuda_graphs needs a CUDA device" in r["runs"][1]["error"]     # recorded, not fatal
    assert r["runs"][2]["engine_options"]["attention"] == "kernel"
    assert r["runs"][2]["engine"] == "fast"
    assert r["floor"]["output_tokens"] == sum(q["n_output_tokens"]
                                              for q in r["runs"][0]["requests"])
    rows = table(r)
    assert [x["rung"] for x in rows] == ["static", "fast:cuda_graphs=0,fused=0"]
    assert rows[0]["x_static"] == 1
    assert label(rows[1]["rung"]) == "fast, eager decode, unfused elementwise"


def test_load_result_reads_gzipped_results(tmp_path, monkeypatch):
    from course_lib.lab import nbtools
    monkeypatch.setattr(nbtools, "RESULTS", tmp_path)
    (tmp_path / "a.json.gz").write_bytes(gzip.compress(b'{"x": 1}'))
    assert nbtools.load_result("a.json") == {"x": 1}
    (tmp_path / "a.json").write_text('{"x": 2}')                      # a plain file comes first
    assert nbtools.load_result("a.json") == {"x": 2}
    with pytest.raises(FileNotFoundError):
        nbtools.load_result("b.json")


def test_chapter_09_rung_lists_parse_and_reproduce_the_stored_run():
    from course_lib.engines import ENGINES
    from course_lib.lab.nbtools import ROOT, load_result
    from course_lib.measure.ladder import LADDER_09, SHORT_09, parse_rung
    settings = {"rows": 2**31, "big": 512, "max_num_batched_tokens": 2048, "max_batch": 64}
    for spec in LADDER_09:
        name, engine, max_batch, options = parse_rung(spec, settings)
        assert engine in ENGINES and max_batch in (64, 512), spec
    assert LADDER_09[:2] == ["static", "hf-cb"] and set(SHORT_09) < set(LADDER_09)
    assert len(set(LADDER_09)) == len(LADDER_09)
    stored = {r["rung"]
              for r in load_result("ladder09_anyscale_llama-1b-dummy_nvidia-h200.json")["runs"]}
    assert stored <= set(LADDER_09)                 # the list reproduces the stored run
    assert "LADDER_09" in (ROOT / "bench" / "gpu" / "gpu_ladder09.sh").read_text()


def test_the_ratio_to_quote_is_to_the_fastest_hf_cb():
    from course_lib.lab.nbtools import load_result
    from course_lib.measure.ladder import fastest_peer, table

    def run(rung, tps, **extra):
        m = {"output_tokens_per_s": tps, "mbu": 0, "mfu": 0, "nvml_gpu_util": None,
             "ttft_s": {"p50": 1}, "tpot_s": {"p50": 1}, **extra}
        return {"rung": rung, "engine": rung.partition(":")[0], "max_batch": 64, "metrics": m}
    result = {"runs": [run("static", 10), run("hf-cb", 20),
                       run("hf-cb:max_memory_percent=0.5", 50, warmup_failures=0),
                       run("fast", 1000),
                       {"rung": "hf-cb:max_batch=512", "engine": "hf-cb", "error": "OOM"}]}
    # not the first, not the failed one
    assert fastest_peer(result) == ("hf-cb:max_memory_percent=0.5", 50)
    rows = {r["rung"]: r for r in table(result)}
    assert rows["fast"]["x_hf_cb"] == 50 and rows["fast"]["x_fastest_hf_cb"] == 20
    assert rows["hf-cb:max_memory_percent=0.5"]["warmup_failures"] == 0
    assert rows["hf-cb"]["warmup_failures"] is None
    stored = load_result("ladder09_anyscale_llama-1b-dummy_nvidia-h200.json")
    assert fastest_peer(stored)[0] == "hf-cb"          # at 512 requests per batch it was slower


def test_chapter_09_pictures_draw_the_stored_results():
    result = load_result("ladder09_anyscale_llama-1b-dummy_nvidia-h200.json")
    assert not any("error" in r for r in result["runs"])          # complete, in one run
    names = [r["rung"] for r in ordered(result["runs"])]
    assert names[:5] == ["static", "dynamic", "continuous", "paged", "chunked"]
    peers = [n for n in names if n.startswith("hf-")]               # last; hf-cb once or twice
    assert names[-len(peers):] == peers and peers[0] == "hf-generate" and "hf-cb" in peers
    assert all(p == "hf-generate" or p.startswith("hf-cb") for p in peers)
    assert "fast:watermark=0.05" in names
    fast = next(r for r in result["runs"]
                if r["rung"] == "fast:kv_memory_mib=16384,max_num_batched_tokens=8192")
    split = time_split(fast)
    assert sum(split[k] for k in ("prefill", "mixed", "decode", "between")) == pytest.approx(
        fast["metrics"]["makespan_s"], rel=0.05)
    ax = plots.ladder_vs_floor(result)
    assert ax.get_yscale() == "log" and len(ax.patches) == len(result["runs"])
    assert [line.get_ydata()[0] for line in ax.lines] == [result["floor"]["output_tokens_per_s"]]
    assert len(plots.utilisation_by_rung(result).patches) == 3 * len(result["runs"])
    assert label("fast:kv_memory_mib=16384,max_num_batched_tokens=8192") == \
        "fast, 16 GiB KV, budget 8192"
    steps = [json.loads((RESULTS / f"decode_step_{m}_nvidia-h200.json").read_text())
             for m in ("llama-1b-dummy", "smollm2-135m")]
    assert len(plots.decode_step_curve(steps).lines) == 8       # 4 curves per model
    assert plots.run_steps(result["runs"][-3]).get_yscale() == "log"
    from course_lib.measure.metrics import prefill_rows
    name = "profile_decode_llama-1b-dummy_nvidia-h200_gathered_{}.json"
    rows = prefill_rows([json.loads((RESULTS / name.format(t)).read_text())
                         for t in ("default_tiles", "BLOCK_M64_BLOCK_N64")])
    assert {(r["prefill"], r["blocks"]) for r in rows} == {(p, b) for p in ("gathered", "in-place")
                                                           for b in ("fresh", "scattered")}
    assert all((r["copy_ms"] > 0) == (r["prefill"] == "gathered") for r in rows)
    assert all(0 < r["flex_ms"] < r["step_ms"] for r in rows)
    assert len(plots.prefill_attention(rows).patches) == 2 * len(rows)
    if importlib.util.find_spec("ipywidgets"):      # CI has it; a bare GPU machine may not
        assert widgets.ladder_explorer(result) is not None
    import matplotlib.pyplot as plt
    plt.close("all")


def test_the_simulator_replays_the_gpu_runs_scheduling_decisions():
    """All requests arrive at once, so the scheduler's decisions do not depend on step times: the
    simulator, running the same overlapped engine on a virtual clock, must preempt exactly as the
    GPU run did, in as many steps."""
    from course_lib.measure.costmodel import StepCost
    from course_lib.measure.simulator import replay
    result = load_result("ladder09_anyscale_llama-1b-dummy_nvidia-h200.json")
    run = next(r for r in result["runs"] if r["rung"] == "fast")      # 2 GiB: it thrashes
    assert run["engine_options"]["overlap"] and run["metrics"]["preemptions"] > 100
    eng, log = replay(StepCost.floor("any", 1e12, 1e15), run)
    assert eng.preemptions == run["metrics"]["preemptions"] and len(log.steps) == len(run["steps"])
    assert [s.rows for s in log.steps] == [s["rows"] for s in run["steps"]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_say_what_eager_launches_say():
    loaded = models.load("tiny", dtype="float32", device="cuda")
    reqs = [Request(f"r{i}", list(range(5, 9 + 3 * i)), max_new_tokens=6) for i in range(5)]
    ref = make_engine("continuous", loaded, max_batch=5, block_size=4, num_blocks=64,
                      attention="gather")
    outs = [[r.output_tokens for r in ref.run(reqs).requests]]       # the reference, eager
    for graphs, fused, overlap in ((False, False, False), (True, False, False), (True, True, False),
                                   (True, True, True)):
        e = make_engine("continuous", loaded, max_batch=5, block_size=4, num_blocks=64,
                        attention="kernel", cuda_graphs=graphs, fused=fused, overlap=overlap)
        e.prepare(reqs)
        log = e.run(reqs)
        outs.append([r.output_tokens for r in log.requests])
        assert bool(e.runner.graphs.graphs) == graphs
        assert e.model.fused == fused and e.overlap == overlap
        # steps end when the GPU finished them (CUDA events), back to back, before their tokens
        # reached the host
        assert all(0 < s.seconds and s.end_s <= t.start_s for s, t in zip(log.steps, log.steps[1:]))
        first_token = min(t for r in log.requests for t in r.token_times)
        assert log.steps[0].end_s <= first_token
    # float32: the fused kernels round as PyTorch does; FlexAttention's tiles are its settings'
    assert all(o == outs[0] for o in outs[1:])


def compiled_triton_kernels() -> set:
    """The compiled variants of the course's Triton kernels, as ``(kernel, specialisation)``
    pairs (Triton 3: per device, the first item of ``device_caches`` maps each specialisation
    to its compiled kernel)."""
    import triton

    from course_lib.kernels import fused, paged_decode
    kernels = [v for m in (fused, paged_decode) for v in vars(m).values()
               if isinstance(v, triton.runtime.JITFunction)]
    assert kernels, "no Triton kernels found"
    return {(k.__name__, str(key)) for k in kernels for cache in k.device_caches.values()
            for key in cache[0]}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("graphs", [False, True])
def test_a_prepared_run_compiles_no_triton_kernel(graphs):
    """A compile inside a timed run would be counted as serving time (a step of a fraction of a
    second). ``prepare`` must leave nothing of the course's Triton kernels to compile, with graphs
    or without (the first GPU run of this test found the unsplit decode kernel compiling in a
    mixed step: a small cache had skipped precompiling it)."""
    loaded = models.load("tiny", dtype="float32", device="cuda")
    reqs = [Request(f"r{i}", list(range(5, 9 + 5 * i)), max_new_tokens=9) for i in range(7)]
    e = make_engine("continuous", loaded, max_batch=6, block_size=4, num_blocks=80,
                    attention="kernel", cuda_graphs=graphs, fused=True, max_num_batched_tokens=24)
    e.prepare(reqs)
    before = compiled_triton_kernels()
    assert before
    e.run(reqs)
    new = compiled_triton_kernels() - before
    assert not new, "compiled in the run:\n" + "\n".join(f"{k}: {key[:600]}"
                                                          for k, key in sorted(new))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_launch_never_waits_for_the_gpu():
    """With ``overlap``, launching a step must not synchronise with the GPU (a blocking copy, a
    boolean mask, ``.item()``...): the host would wait there for the step in flight. CUDA's sync
    debug mode turns any such wait inside ``launch`` into an error."""
    loaded = models.load("tiny", dtype="float32", device="cuda")
    reqs = [Request(f"r{i}", list(range(5, 30 + 7 * i)), max_new_tokens=12) for i in range(6)]
    e = make_engine("continuous", loaded, max_batch=4, block_size=4,
                    num_blocks=40, max_num_batched_tokens=40, attention="kernel")   # preempts
    e.prepare(reqs)
    e.run(reqs)                                   # compiles what prepare did not
    launch, kinds, waits = e.runner.launch, set(), Counter()
    with gpu_waits() as seen:                     # the watch sees a wait it must see
        torch.ones(1, device="cuda").item()
    assert sum(seen.values()) == 1, seen

    def strict(plan):
        kinds.add("decode" if plan.decode_only else "packed")
        with gpu_waits() as seen:
            out = launch(plan)
        waits.update(seen)
        return out
    e.runner.launch = strict
    log = e.run(reqs)
    assert not waits, "launch waited for the GPU at:\n" + "\n".join(
        f"{n}x {w}" for w, n in sorted(waits.items()))
    assert e.overlap and e.preemptions > 0 and kinds == {"decode", "packed"}
    assert all(len(r.output_tokens) == 12 for r in log.requests)


def test_precompiling_the_kernel_path_leaves_the_cache_empty():
    from course_lib.kernels.paged_decode import SELFCHECK_SHAPE as shape
    from course_lib.kernels.paged_decode import KernelPagedAttention
    from course_lib.model.kv_cache import PagedKVCache
    cache = PagedKVCache(shape, BlockManager(300, 16), torch.float32, "cpu")
    KernelPagedAttention.precompile(cache, 256, shape, torch.float32)   # on the CPU: the references
    assert cache.blocks.n_free == 300 and not cache.tables


def test_gc_pauses_land_in_the_step_they_fall_in_and_only_while_watched():
    import gc

    from bench.host_overlap import gc_pauses
    records, callbacks = [{"kind": "packed"}], list(gc.callbacks)
    with gc_pauses(records):
        gc.collect(1)
        records.append({"kind": "decode"})
        gc.collect()
    assert records[0]["gc_ms"] > 0 and records[0]["gc_generation"] == 1
    assert records[1]["gc_ms"] > 0 and records[1]["gc_generation"] == 2
    assert gc.callbacks == callbacks                  # the watch is gone with the block
    records.append({"kind": "decode"})
    gc.collect()
    assert "gc_ms" not in records[-1]



def test_each_step_gets_the_clock_samples_of_its_own_stretch_of_gpu_time():
    """Step 1 is launched before step 0's GPU work ends (overlap): its stretch starts where step
    0's ends, so the slow samples at the start of step 0 are step 0's only; a step the host never
    saw finish gets none."""
    from bench.host_overlap import clock_table, clocks_by_step
    records = [{"kind": "packed", "rows": 64, "launched_s": 0.0, "gpu_done_s": 1.0, "wait_ms": 5},
               {"kind": "packed", "rows": 96, "launched_s": 0.5, "gpu_done_s": 2.0, "wait_ms": 9},
               {"kind": "decode", "rows": 96, "launched_s": 1.8, "gpu_done_s": 3.0},
               {"kind": "decode", "rows": 96, "launched_s": 2.9}]
    samples = [(0.1, 1500, 690.0, 0x4), (0.6, 1510, 700.0, 0x4), (0.9, 1980, 500.0, 0),
               (1.2, 1980, 650.0, 0), (1.7, 1700, 699.0, 0x80), (2.5, 1980, 400.0, 0),
               (3.5, 1000, 100.0, 0x40)]
    clocks_by_step(records, samples)
    assert (records[0]["sm_mhz"], records[0]["power_w"], records[0]["slowdowns"]) == (
        1510, 700.0, ["power cap"])
    assert (records[1]["sm_mhz"], records[1]["power_w"], records[1]["slowdowns"]) == (
        1840, 699.0, ["power brake"])            # the median of 1980 and 1700
    assert (records[2]["sm_mhz"], records[2]["slowdowns"]) == (1980, [])
    assert "sm_mhz" not in records[3]
    table = clock_table(records, len(samples))
    assert "   0    64      5.0     1510       700  power cap" in table
    assert "slowed down in 0 of 1" in table


def test_the_clock_sampler_reads_instant_power_where_nvml_has_it():
    """NVML's plain power reading is a one-second average on recent cards: the sampler reads the
    instant field where it answers, and says which it used."""
    from types import SimpleNamespace

    from bench.host_overlap import ClockSampler

    class Nvml:
        NVML_FI_DEV_POWER_INSTANT, NVML_SUCCESS = 186, 0

        def __init__(self, instant):
            self.instant = instant

        def nvmlDeviceGetFieldValues(self, handle, ids):
            assert ids == [186]
            if not self.instant:
                raise RuntimeError("field not supported")
            return [SimpleNamespace(nvmlReturn=0, value=SimpleNamespace(uiVal=650_000))]

        def nvmlDeviceGetPowerUsage(self, handle):
            return 600_000                                   # mW, the one-second average

    for instant, watts, kind in ((True, 650.0, "instant"), (False, 600.0, "average")):
        sampler = ClockSampler()
        sampler._nvml, sampler._handle = Nvml(instant), None
        assert [sampler._power_w(), sampler._power_w()] == [watts, watts]
        assert sampler.power_kind == kind


def test_host_summary_takes_medians_per_step_kind_and_batch_range():
    from bench.host_overlap import host_summary
    from course_lib.measure.metrics import host_table
    def rec(kind, rows, launch, schedule=1.0):
        return {"kind": kind, "rows": rows, "schedule_ms": schedule, "launch_ms": launch,
                "wait_ms": 2.0, "retire_ms": 0.5}
    records = [rec("packed", 40, 20.0, None), rec("packed", 50, 30.0), rec("packed", 60, 25.0),
               rec("decode", 300, 1.0), rec("decode", 512, 3.0),
               {"kind": "decode", "rows": 8, "launch_ms": 9.0, "schedule_ms": 0.1}]  # not done
    rows = host_summary(records)
    assert [(r["kind"], r["rows"], r["steps"]) for r in rows] == [("packed", "33-128", 3),
                                                                  ("decode", "257-max", 2)]
    assert rows[0]["launch_ms"] == 25.0 and rows[0]["schedule_ms"] == 1.0
    assert rows[1]["launch_ms"] == 2.0
    first = host_summary([rec("packed", 3, 5.0, None)])
    assert first[0]["schedule_ms"] is None
    assert "25.00" in host_table(rows) and host_table(first).split()[-4] == "-"


@pytest.fixture
def shapes(monkeypatch):
    """The (queries, keys) shapes of every packed-copy prompt attention built from here on; the
    attention itself returns its queries (only the shapes are under test)."""
    from course_lib.model.attention import GatheredFlexAttention
    seen, init = [], GatheredFlexAttention.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seen.append(tuple(self.block_mask.seq_lengths))
    monkeypatch.setattr(GatheredFlexAttention, "__init__", spy)
    monkeypatch.setattr(GatheredFlexAttention, "attend", lambda self, layer, q: q)
    return seen


@pytest.mark.parametrize("budget", [2048, 8192])
def test_every_prompt_step_of_the_fast_rung_has_a_precompiled_shape(budget, shapes):
    """The packed-copy prefill's kernel is compiled per (queries, keys) bucket before a run's clock
    starts (``GatheredFlexAttention.precompile``); a step of another shape would compile inside
    the timed run and stall it for seconds. On chapter 09's workload, at the ladder's budgets, every
    prompt step must have a precompiled shape, chunks after earlier chunks included."""
    from course_lib.engines.paged import PagedEngine
    from course_lib.model.attention import GatheredFlexAttention
    engine = PagedEngine(LOADED, max_batch=96, block_size=16, num_blocks=8192, attention="kernel",
                         max_num_batched_tokens=budget, model=FakeLlama(), trace_blocks=False)
    GatheredFlexAttention.precompile(engine.new_cache([]), budget, FakeLlama.shape, torch.float32)
    compiled, shapes[:] = set(shapes), []
    assert {n for n, _ in compiled} == {128 << i for i in range((budget // 128).bit_length())}
    engine.run(load_workload("anyscale:prompt_len=512,cap=512,mean=128", n=96, vocab_size=64))
    assert shapes and set(shapes) <= compiled, sorted(set(shapes) - compiled)
    assert any(m > n for n, m in shapes)          # some chunks did come after earlier ones


def test_a_cache_too_small_for_a_bucket_s_tokens_still_has_its_shapes_precompiled(shapes):
    """SmolLM2's eager run at 32 sequences (notebook 09) spent 1.3 s in its first step, the 32
    prompts together (1,231 tokens: the 2048 bucket), where the same step took 24 ms right after.
    Its cache, sized for those requests, could not hold a bucket's tokens twice over, and
    precompiling used to stop there. Shapes need no real tokens: every step must find its own."""
    from course_lib.engines.paged import PagedEngine
    from course_lib.model.attention import GatheredFlexAttention
    reqs = [Request(f"r{i}", [7] * 37 + [12], max_new_tokens=64) for i in range(32)]
    engine = PagedEngine(LOADED, max_batch=32, block_size=16, attention="kernel", model=FakeLlama(),
                         trace_blocks=False)
    cache = engine.new_cache(reqs)                 # room for these requests and no more
    assert cache.blocks.n_blocks * 16 < 2 * 2048
    GatheredFlexAttention.precompile(cache, sum(len(r.prompt_tokens) + 64 for r in reqs),
                                     FakeLlama.shape, torch.float32)
    assert cache.blocks.n_free == cache.blocks.n_blocks and not cache.tables
    compiled, shapes[:] = set(shapes), []
    engine.run(reqs)
    assert (2048, 2048) in shapes and set(shapes) <= compiled, sorted(set(shapes) - compiled)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_a_decode_step_split_in_two_halves_gives_the_whole_step_s_tokens(device):
    """bench/decode_step.py's ``HalvesDecodeGraphs``: from ``split_from`` sequences up a decode
    step runs as two halves of the batch (on two streams inside the CUDA graph; one after the
    other on the CPU). The rows do not interact, so each sequence must get the token the whole
    step gives it, and the cache the same keys."""
    from bench.decode_step import HalvesDecodeGraphs
    from course_lib.model.kv_cache import PagedKVCache
    from course_lib.model.llama import Llama
    model = Llama.from_hf(models.load("tiny", dtype="float32", device=device).model)
    got = {}
    for split in (None, 4):
        cache = PagedKVCache(model.shape, BlockManager(200, 4), model.dtype, device)
        g = torch.Generator().manual_seed(0)
        for t in cache.k + cache.v:
            t.copy_(torch.randn(t.shape, generator=g))
        cache.grow_side_by_side({i: 5 + 3 * i for i in range(7)})
        graphs = DecodeGraphs(model, cache, 8, 12) if split is None else \
            HalvesDecodeGraphs(model, cache, 8, 12, split_from=split)
        assert bool(graphs.graphs) == (device == "cuda")
        rows = [(11 + i, cache.lengths[i] - 1, cache.tables[i]) for i in range(7)]
        got[split] = (graphs.step(rows), graphs.step(rows[:3]), [k.clone() for k in cache.k])
    assert got[4][:2] == got[None][:2] and len(set(got[4][0])) > 1
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got[4][2], got[None][2]))


def test_the_split_engine_runs_as_fast_as_the_one_it_replaced():
    """The stored comparison (bench/gpu/gpu_compare.sh on one H200): the fast engine after the
    split into scheduler, block manager and model runner, against the same rung before it, in
    interleaved processes on one card: within 5% of it, and at least 20x hf-cb in one process."""
    runs = load_result("compare_fast_ea5581a_73a4c84_nvidia-h200.json")["runs"]
    tput = {k: {x["rung"].partition(":")[0]: x["metrics"]["output_tokens_per_s"]
                for x in r["runs"]} for k, r in runs.items()}
    assert {r["versions"]["gpu"]["uuid"] for r in runs.values()} == {
        runs["new_2"]["versions"]["gpu"]["uuid"]}                          # one card
    assert {r["versions"]["course_lib_commit"] for k, r in runs.items() if k.startswith("old")} \
        == {"ea5581a"}
    old = (tput["old_1"]["graphs"] + tput["old_2"]["graphs"]) / 2
    new = (tput["new_1"]["fast"] + tput["new_2"]["fast"]) / 2
    assert abs(new / old - 1) < 0.05
    assert tput["new_2"]["fast"] / tput["new_2"]["hf-cb"] >= 20


def _compare(name: str, old: str, new: str):
    """A stored gpu_compare.sh run: each step kind's seconds and the fast rung's tokens/s per
    process (old_1, new_1, old_2, new_2), after checking its card and commits."""
    from bench.floor_by_step import by_kind
    runs = load_result(name)["runs"]
    assert len({r["versions"]["gpu"]["uuid"] for r in runs.values()}) == 1       # one card
    commits = {k: r["versions"]["course_lib_commit"] for k, r in runs.items()}
    assert commits == {"old_1": old, "old_2": old, "new_1": new, "new_2": new}
    rung = "fast:kv_memory_mib=16384,max_num_batched_tokens=16384"
    kinds = {k: {kind: row["seconds"] for kind, row in by_kind(r, rung).items()}
             for k, r in runs.items()}
    tput = {k: {x["rung"]: x["metrics"]["output_tokens_per_s"] for x in r["runs"]}
            for k, r in runs.items()}
    return kinds, {k: t[rung] for k, t in tput.items()}, tput["new_2"]["hf-cb"]


def _mixed_faster_decode_same(kinds):
    old, new = [kinds["old_1"], kinds["old_2"]], [kinds["new_1"], kinds["new_2"]]
    assert max(n["mixed"] for n in new) < min(o["mixed"] for o in old)
    for kind in kinds["old_1"]:
        if kind.startswith("decode"):
            assert max(n[kind] for n in new) < 1.03 * min(o[kind] for o in old), kind


def test_the_mixed_steps_got_faster_and_nothing_else_slower():
    """The stored comparison of the fast engine after the mixed-step changes (the packed key
    copy in 8-byte words, chunks' keys aligned with their queries, queries with their padding
    rows) against the commit before, interleaved on one H200: in each new run the mixed steps
    took less time than in either old run, and each kind of decode step stayed within 3%."""
    kinds, tput, _ = _compare("compare_fast_ae08a0f_244ca6b_nvidia-h200.json", "ae08a0f", "244ca6b")
    _mixed_faster_decode_same(kinds)
    assert min(tput["new_1"], tput["new_2"]) > max(tput["old_1"], tput["old_2"])


def test_padding_the_output_head_s_rows_made_the_engine_faster():
    """The stored comparison of the fast engine with the output head's rows padded to a power of
    two and each count run once before the run (no first-use stall at a new row count) against
    the commit before, interleaved on one H200: the mixed steps faster in each new run than in
    either old one, decode steps within 3%, tokens/s up in both runs, and at least 20x hf-cb."""
    kinds, tput, hf = _compare("head_rows_compare_nvidia-h200.json", "3695e84",
                               "6c3d505")
    _mixed_faster_decode_same(kinds)
    assert min(tput["new_1"], tput["new_2"]) > max(tput["old_1"], tput["old_2"])
    assert tput["new_2"] / hf >= 20
