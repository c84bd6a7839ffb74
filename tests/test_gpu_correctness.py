"""The fast engine on a GPU, in float32 on SmolLM2, gives Hugging Face's greedy tokens: with its
CUDA defaults, chunked, preempting and with prefix caching (``bench/gpu_correctness.py``). It runs
wherever CUDA is present; the stored H200 run is checked everywhere."""
import pytest
import torch

from bench.gpu_correctness import CASES, check
from course_lib.lab.nbtools import RESULTS, load_result
from course_lib.model import models


def assert_agree(runs):
    assert [r["case"] for r in runs] == list(CASES)
    for r in runs:
        a = r["agreement_with_hf"]
        assert a["requests"] > 0 and a["requests_identical"] == a["requests"], (r["case"], a)
        assert r["engine"] == "fast" and r["device"]["type"] == "cuda"
    cases = {r["case"]: r["metrics"] for r in runs}
    assert cases["preempting"]["preemptions"] > 0
    assert cases["prefix caching"]["prefix_hit_tokens"] > 0


def test_the_stored_gpu_run_gives_hugging_face_s_tokens():
    # stored: a missing file fails here (a skip would hide the only check of the GPU's tokens on
    # a machine without CUDA)
    name = "gpu_correctness_smollm2-135m_nvidia-h200.json"
    assert (RESULTS / name).exists(), (
        f"{name} is missing: python -m bench gpu_correctness on an H200")
    assert_agree(load_result(name)["runs"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_fast_engine_on_this_gpu_gives_hugging_face_s_tokens():
    loaded = models.load("smollm2-135m", dtype="float32", device="cuda")
    assert_agree(check(loaded, 20, 64, echo=lambda *_: None))   # the stored run's size
