"""The engines of chapter 00-01 and the bench CLI, on the tiny random model (fast)."""
import json

import pytest
import torch

from course_lib import bench
from course_lib.engines import ENGINES, make_engine
from course_lib.requests import Request


def reqs(n=5, max_new=6):
    g = torch.Generator().manual_seed(0)
    return [Request(f"r{i}", torch.randint(3, 1000, (3 + 2 * i,), generator=g).tolist(), max_new)
            for i in range(n)]


def test_sequential_equals_hf_generate_on_the_tiny_model(tiny):
    requests = reqs()
    log = make_engine("sequential", tiny).run(requests)
    for req, rec in zip(requests, log.requests):
        out = tiny.model.generate(torch.tensor([req.prompt_tokens]),
                                  max_new_tokens=req.max_new_tokens, do_sample=False,
                                  pad_token_id=2)
        assert rec.output_tokens == out[0, len(req.prompt_tokens):].tolist()


@pytest.mark.parametrize("engine", ["sequential", "hf-generate"])
def test_step_log_accounts_for_every_token(tiny, engine):
    requests = reqs()
    log = make_engine(engine, tiny, max_batch=2).run(requests)
    out = sum(len(r.output_tokens) for r in log.requests)
    assert sum(s.prefill_tokens for s in log.steps) == sum(len(r.prompt_tokens) for r in requests)
    assert sum(s.decode_tokens for s in log.steps) == out - len(requests)   # last: not fed back
    assert all(s.slots >= s.useful for s in log.steps)
    assert all(s.end_s >= s.start_s for s in log.steps)


def test_hf_generate_batches_agree_with_sequential(tiny):
    requests = reqs(6)
    a = make_engine("sequential", tiny).run(requests)
    b = make_engine("hf-generate", tiny, max_batch=3).run(requests)
    for x, y in zip(a.requests, b.requests):
        assert x.output_tokens == y.output_tokens


def test_hf_cb_passes_its_memory_share_and_agrees_with_sequential(tiny, monkeypatch):
    from transformers.generation import configuration_utils
    seen = {}

    class Spy(configuration_utils.ContinuousBatchingConfig):
        def __init__(self, **kwargs):
            seen.update(kwargs)
            super().__init__(**kwargs)

    monkeypatch.setattr(configuration_utils, "ContinuousBatchingConfig", Spy)
    requests = reqs(4)
    a = make_engine("sequential", tiny).run(requests)
    b = make_engine("hf-cb", tiny, max_batch=2, max_memory_percent=0.5).run(requests)
    assert seen["max_memory_percent"] == 0.5 and seen["max_requests_per_batch"] == 2
    assert [r.output_tokens for r in a.requests] == [r.output_tokens for r in b.requests]
    seen.clear()
    make_engine("hf-cb", tiny, max_batch=2).run(requests[:1])
    assert "max_memory_percent" not in seen              # HF's own default unless asked


def test_hf_cb_counts_the_warmups_hf_gives_up_on(tiny, monkeypatch):
    import logging

    from transformers.generation.continuous_batching import ContinuousBatchingManager
    real = ContinuousBatchingManager.warmup

    def warmup(self):                  # as HF's model runner does when a warm-up runs out of memory
        logging.getLogger("ContinuousBatchingLogger").warning(
            "Failed to warm up: CUDA out of memory.")
        real(self)

    engine = make_engine("hf-cb", tiny, max_batch=2)
    engine.run(reqs(1))
    assert engine.warmup_failures == 0
    monkeypatch.setattr(ContinuousBatchingManager, "warmup", warmup)
    engine.run(reqs(1))
    assert engine.warmup_failures == 1


def test_bad_requests_are_refused_and_the_others_served(tiny):
    good = reqs(2)
    bad = [Request("empty", [], 4), Request("zero", [5, 6], 0),
           Request("huge", [5] * 2040, 100)]
    for name in ENGINES:
        if name == "vllm":          # its own process, on a GPU only (tests/test_cli.py)
            continue
        log = make_engine(name, tiny, max_batch=2).run(good + bad)
        by = {r.id: r for r in log.requests}
        assert by["empty"].finish_reason == "refused" and "empty" in by["empty"].error
        assert by["zero"].finish_reason == "refused" and "max_new_tokens" in by["zero"].error
        assert by["huge"].finish_reason == "refused" and "2048" in by["huge"].error
        assert all(by[r.id].finish_reason == "length" and len(by[r.id].output_tokens) == 6
                   for r in good), name


def test_max_batch_must_be_positive(tiny):
    with pytest.raises(ValueError, match="max_batch"):
        make_engine("sequential", tiny, max_batch=0)


def test_unknown_engine_is_named(tiny):
    with pytest.raises(ValueError, match="sequential"):
        make_engine("nope", tiny)


def test_bench_cli_writes_the_contract(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(bench.models, "load", lambda *a, **k: tiny)
    out = tmp_path / "r.json"
    bench.main(["--engine", "hf-generate", "--model", "tiny", "--workload",
                "anyscale:prompt_len=16,cap=8,mean=4", "--n", "6", "--max-batch", "3",
                "--device", "cpu", "--tokens", "--json", str(out)])
    r = json.loads(out.read_text())
    for key in ["engine", "model", "device", "versions", "metrics", "requests", "command"]:
        assert key in r
    m = r["metrics"]
    for key in ["output_tokens_per_s", "slot_utilisation", "mbu", "mfu"]:
        assert m[key] is not None and m[key] > 0, key
    for key in ["ttft_s", "tpot_s"]:
        assert set(m[key]) >= {"p50", "p90", "p99"}
    assert r["device"]["bandwidth"] > 0 and r["device"]["flops"] > 0
    assert r["versions"]["host"] and r["versions"]["cpu_count"] >= 1 and "cpu" in r["versions"]
    assert 0.1 < r["versions"]["host_python_ms"] < 1000              # a real timing, in ms
    assert len(r["requests"]) == 6
    row = r["requests"][0]
    assert set(row) >= {"id", "ttft_s", "e2e_s", "finish_reason", "output_tokens"}
    assert all(len(q["output_tokens"]) <= 8 for q in r["requests"])


def test_request_ids_must_be_unique():
    from fakes import LOADED, FakeLlama, req

    from course_lib.engines import make_engine
    e = make_engine("continuous", LOADED, model=FakeLlama(), max_batch=2)
    with pytest.raises(ValueError, match="'a' appears more than once"):
        e.run([req("a", 3), req("a", 2)])
