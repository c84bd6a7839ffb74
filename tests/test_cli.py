"""The bench CLI: every registry name and the fast engine's flags reach the engine; bad input ends
with one line on stderr (``error: <file>:<line>: ...`` for a request file) and exit status 2,
never a traceback; make_engine refuses options an engine does not take, by name."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from course_lib import bench
from course_lib.engines import REGISTRY, EngineOptionError, make_engine
from course_lib.engines.paged import PagedEngine
from course_lib.measure.metrics import run_label
from course_lib.requests import Request, RequestError, WorkloadError, load_jsonl, validate
from tests.fakes import LOADED, FakeLlama

ROOT = Path(__file__).resolve().parent.parent
BAD = {   # file content -> (line, words the message must hold)
    "neg": ('{"id": 1, "prompt_tokens": [5], "max_new_tokens": 4}\n'
            '{"id": 2, "prompt_tokens": [5], "max_new_tokens": -3}\n', 2, "max_new_tokens"),
    "zero": ('{"id": 1, "prompt_tokens": [5], "max_new_tokens": 0}\n', 1, "max_new_tokens"),
    "notstr": ('{"id": 1, "prompt": 42, "max_new_tokens": 4}\n', 1, "'prompt' must be a string"),
    "missing": ('{"id": 1, "max_new_tokens": 4}\n', 1, "'prompt' or 'prompt_tokens'"),
    "empty": ('\n{"id": 1, "prompt": "  ", "max_new_tokens": 4}\n', 2, "'prompt' is empty"),
    "oov": ('{"id": 1, "prompt_tokens": [5, 49152], "max_new_tokens": 4}\n', 1,
            "outside the model's vocabulary of 49152"),
    "json": ('{"id": 1, "prompt_tokens": [5], "max_new_tokens": 4\n', 1, "invalid JSON"),
    "array": ('[{"id": 1, "prompt_tokens": [5], "max_new_tokens": 4}]\n', 1, "JSON object"),
}


def cli(*args, cwd=ROOT):
    """The CLI in this process (a fresh interpreter per case costs seconds of imports): its exit
    status and what it printed. An exception that escapes main() fails the test, as a traceback
    would fail the user; one test below runs the real command to show that too."""
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            bench.main(list(args))
        except SystemExit as e:
            code = e.code
    return SimpleNamespace(returncode=code, stderr=err.getvalue())


def cli_process(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "course_lib.bench", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                               "HOME": str(Path.home())})


def one_error_line(p) -> str:
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(lines) == 1, p.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_request_file_is_one_line_naming_file_and_line(case, tmp_path):
    text, line, words = BAD[case]
    path = tmp_path / f"{case}.jsonl"
    path.write_text(text)
    msg = one_error_line(cli("--engine", "static", "--workload", str(path),
                             "--json", str(tmp_path / "out.json")))
    assert msg.startswith(f"error: {path}:{line}: ") and words in msg, msg
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("args,words", [
    (["--engine", "nope"], "unknown engine 'nope'"),
    (["--engine", "static", "--model", "nope"], "unknown model 'nope'"),
    (["--engine", "static", "--max-new-tokens", "-1"], "max_new_tokens must be >= 1"),
    (["--engine", "static", "--attention", "flex"], "engine 'static' does not take 'attention'"),
    (["--engine", "chunked", "--cuda-graphs", "--device", "cpu"], "cuda_graphs needs a CUDA"),
    (["--engine", "static", "--workload", "tests/fakes.py"], "is not a .jsonl file"),
])
def test_bad_arguments_are_one_line(args, words, tmp_path):
    msg = one_error_line(cli(*args, "--json", str(tmp_path / "out.json")))
    assert words in msg, msg


def test_the_command_itself_prints_one_line_and_no_traceback(tmp_path):
    path = tmp_path / "neg.jsonl"
    path.write_text(BAD["neg"][0])
    msg = one_error_line(cli_process("--engine", "static", "--workload", str(path),
                                     "--json", str(tmp_path / "out.json")))
    assert msg.startswith(f"error: {path}:2: ")


def test_a_binary_file_is_not_jsonl(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"id": 1, "prompt_tokens": [5], "max_new_tokens": 2}\n\xff\xfe\x00garbage\n')
    with pytest.raises(WorkloadError, match=f"{path}:2: not UTF-8"):
        load_jsonl(path)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None and torch.cuda.is_available(),
                    reason="vLLM and CUDA are here: the engine runs")
def test_vllm_without_vllm_or_cuda_says_what_to_install(tmp_path):
    msg = one_error_line(cli("--engine", "vllm", "--json", str(tmp_path / "out.json")))
    assert msg == ("error: engine 'vllm' needs vLLM 0.26 on a CUDA machine "
                   "(pip install vllm==0.26.0)")


def test_out_of_vocabulary_ids_are_refused_before_any_forward_pass():
    with pytest.raises(RequestError, match="outside the model's vocabulary of 64"):
        validate(Request("a", [3, 64], 2), 4096, vocab_size=64)
    model = FakeLlama()
    model.hidden_states = None                          # a forward pass would fail loudly
    eng = make_engine("continuous", LOADED, model=model, max_batch=2)
    log = eng.run([Request("a", [3, 64], 2)])
    assert log.requests[0].finish_reason == "refused" and "vocabulary" in log.requests[0].error


def test_every_documented_option_is_taken_and_others_are_named():
    for name in ("chunked", "paged", "fast"):
        assert REGISTRY[name].cls is PagedEngine
        e = make_engine(name, LOADED, model=FakeLlama(), overlap=False, watermark=0.1,
                        max_num_batched_tokens=32, block_size=4, num_blocks=50)
        assert e.name == name and e.overlap is False and e.watermark.fraction == 0.1
    e = make_engine("continuous", LOADED, model=FakeLlama(), overlap=False)   # not a TypeError
    assert isinstance(e, PagedEngine) and e.name == "chunked"
    with pytest.raises(EngineOptionError, match="'static' does not take 'block_size', 'fused'"):
        make_engine("static", LOADED, model=FakeLlama(), block_size=16, fused=True)
    with pytest.raises(EngineOptionError, match="'paged' does not take 'nope'"):
        make_engine("paged", LOADED, model=FakeLlama(), nope=1)


def test_each_engine_has_its_chapters_defaults_on_the_cpu():
    chunked, paged, fast = (make_engine(n, LOADED, model=FakeLlama()) for n in (
        "chunked", "paged", "fast"))
    assert (chunked.max_num_batched_tokens, chunked.attention, chunked.num_blocks) == (
        2048, "gather", None)
    assert (paged.max_num_batched_tokens, paged.attention) == (None, "gather")
    run = fast.runner
    assert (fast.max_num_batched_tokens, run.attention, run.cuda_graphs, run.fused, run.overlap) \
        == (16384, "kernel", False, False, False)


@pytest.mark.parametrize("options,name", [
    ({"max_num_batched_tokens": 8}, "chunked"), ({"block_size": 4}, "chunked"),
    ({"num_blocks": 40}, "paged"), ({"kv_memory_bytes": 2**20}, "paged"),
    ({"attention": "flex"}, "paged"), ({"attention": "kernel"}, "fast"), ({}, "continuous"),
])
def test_continuous_with_paged_options_records_what_it_resolved_to(options, name):
    e = make_engine("continuous", LOADED, model=FakeLlama(), max_batch=2, **options)
    assert e.name == name
    log = e.run([Request("a", [3, 4, 5], 3)])
    assert log.engine == name


def test_the_cli_runs_the_fast_engine_with_its_flags_and_labels_it(tmp_path, monkeypatch, tiny):
    monkeypatch.setattr(bench.models, "load", lambda *a, **k: tiny)
    out = tmp_path / "r.json"
    bench.main(["--engine", "fast", "--model", "smollm2-135m", "--workload",
                "anyscale:prompt_len=8,cap=4,mean=2", "--n", "4", "--max-batch", "2",
                "--device", "cpu", "--no-overlap", "--watermark", "0.1",
                "--max-num-batched-tokens", "64", "--json", str(out)])
    r = json.loads(out.read_text())
    o = r["engine_options"]
    assert r["engine"] == "fast" and o["attention"] == "kernel" and o["overlap"] is False
    assert o["watermark"] == 0.1 and o["max_num_batched_tokens"] == 64
    assert run_label(r) == "fast, kernel, blocks of 16, budget 64, 10% kept free, B=2"
    bench.main(["--engine", "continuous", "--model", "smollm2-135m", "--workload",
                "anyscale:prompt_len=8,cap=4,mean=2", "--n", "4", "--device", "cpu",
                "--max-num-batched-tokens", "16", "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["engine"] == "chunked" and r["engine_options"]["max_num_batched_tokens"] == 16
