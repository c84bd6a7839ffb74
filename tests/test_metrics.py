"""Metrics and the bytes/FLOPs accounting, on hand-made numbers."""
import math

import pytest

from course_lib.measure.metrics import RequestRecord, RunLog, Step, percentiles, summarize
from course_lib.measure.roofline import Peaks, matmul_params_per_token, step_work, weight_bytes
from course_lib.model import models
from course_lib.model.llama import LlamaShape


@pytest.fixture(scope="module")
def shape():
    from transformers import LlamaConfig
    return LlamaShape.from_config(LlamaConfig(**models.PRESETS["smollm2-135m"].config))


def test_parameter_count_of_smollm2_is_135m(shape):
    from transformers import LlamaConfig
    total = models.parameter_count(LlamaConfig(**models.PRESETS["smollm2-135m"].config))["total"]
    assert 134_000_000 < total < 135_000_000
    # what a forward reads: every weight once (the tied head is the embedding table)
    assert weight_bytes(shape, 2) == 2 * total


def test_llama_1b_dummy_has_the_1_24b_shape():
    from transformers import LlamaConfig
    total = models.parameter_count(LlamaConfig(**models.PRESETS["llama-1b-dummy"].config))["total"]
    assert 1_230_000_000 < total < 1_240_000_000


def test_decode_step_flops_are_two_per_parameter(shape):
    w = step_work(shape, 4, tokens=1, attended=0, kv_read=0, logit_rows=1)
    assert w.flops == 2 * (matmul_params_per_token(shape) + shape.vocab_size * shape.hidden)
    # batching 8 tokens: 8x the FLOPs, the same weight bytes, only the KV writes added
    w8 = step_work(shape, 4, tokens=8, attended=0, kv_read=0, logit_rows=8)
    assert w8.flops == 8 * w.flops
    kv = shape.n_layers * 2 * shape.n_kv_heads * shape.head_dim * 4
    assert w8.bytes - w.bytes == 7 * kv


def test_attention_flops_and_kv_bytes_grow_with_context(shape):
    a = step_work(shape, 2, tokens=1, attended=101, kv_read=100, logit_rows=1)
    b = step_work(shape, 2, tokens=1, attended=1, kv_read=0, logit_rows=1)
    assert a.flops - b.flops == 4 * shape.n_layers * shape.n_heads * shape.head_dim * 100
    assert a.bytes - b.bytes == 100 * shape.n_layers * 2 * shape.n_kv_heads * shape.head_dim * 2


def test_percentiles():
    p = percentiles(range(1, 101))
    assert p["p50"] == pytest.approx(50.5) and p["p99"] == pytest.approx(99.01)
    assert percentiles([None])["p50"] is None


def make_log():
    a = RequestRecord("a", arrival_s=0.0, prompt_len=4)
    b = RequestRecord("b", arrival_s=0.5, prompt_len=2)
    for t, tok in [(1.0, 5), (1.5, 6), (2.0, 7)]:
        a.emit(tok, t)
    a.finish("length", 2.0)
    b.emit(9, 1.0)
    b.finish("eos", 1.0)
    c = RequestRecord("c", arrival_s=0.0, prompt_len=0)
    c.finish_reason, c.error = "refused", "empty prompt"
    steps = [Step(0.0, 1.0, rows=2, slots=8, prefill_tokens=6, decode_tokens=0, attended=13,
                  kv_read=0, logit_rows=2),
             Step(1.0, 1.5, rows=2, slots=2, prefill_tokens=0, decode_tokens=1, attended=5,
                  kv_read=4, logit_rows=1),
             Step(1.5, 2.0, rows=2, slots=2, prefill_tokens=0, decode_tokens=1, attended=6,
                  kv_read=5, logit_rows=1)]
    return RunLog("test", [a, b, c], steps, 2.0)


def test_summarize_latencies_and_throughput():
    m = summarize(make_log())
    assert m["served"] == 2 and m["refused"] == 1 and m["output_tokens"] == 4
    assert m["output_tokens_per_s"] == pytest.approx(4 / 2.0)
    assert m["ttft_s"]["p50"] == pytest.approx((1.0 + 0.5) / 2)      # a: 1.0, b: 0.5
    assert m["tpot_s"]["p50"] == pytest.approx(0.5)                   # only a has >= 2 tokens
    assert m["slot_utilisation"] == pytest.approx(8 / 12)


def test_summarize_mbu_mfu(shape):
    peaks = Peaks("test", "float32", bandwidth=1e9, flops=1e10, method="made up")
    log = make_log()
    m = summarize(log, shape, 4, peaks)
    work = [step_work(shape, 4, s.useful, s.attended, s.kv_read, s.logit_rows) for s in log.steps]
    assert m["mbu"] == pytest.approx(sum(w.bytes for w in work) / 2.0 / 1e9)
    assert m["mfu"] == pytest.approx(sum(w.flops for w in work) / 2.0 / 1e10)
    assert not math.isnan(m["mbu"])
