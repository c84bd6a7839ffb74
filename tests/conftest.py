"""Shared fixtures: the real model and the tiny random one, loaded once per test session."""
import pytest

from course_lib.model import models
from course_lib.model.llama import Llama


@pytest.fixture(scope="session")
def smollm():
    """SmolLM2-135M-Instruct, real weights, float32 on the CPU."""
    return models.load("smollm2-135m", dtype="float32")


@pytest.fixture(scope="session")
def smollm_ours(smollm):
    return Llama.from_hf(smollm.model)


@pytest.fixture(scope="session")
def tiny():
    return models.load("tiny", dtype="float32", seed=0)
