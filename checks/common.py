"""What the exercise checks share: how a check reports, compares and loads the real model. Each
``check_*`` calls the learner's function on fresh inputs, compares with the course's reference,
prints one line when it is right and raises ``AssertionError`` (with a hint) when it is not."""
from __future__ import annotations

import copy
import functools
import math
import operator

import torch

from course_lib.model import models
from course_lib.model.llama import Llama


def ok(msg):
    print(f"✓ {msg}")


def compare(fn, ref, cases, where: str, hint: str = "", same=operator.eq):
    """Each case, a tuple of arguments: ``fn`` must give what ``ref`` gives (by ``same``). A
    failure names the case as ``where.format(*case)``, then adds ``hint``."""
    for case in cases:
        got, want = fn(*copy.deepcopy(case)), ref(*case)
        assert same(got, want), f"{where.format(*case)}: got {got}, expected {want}{hint}"


def as_tensor(got, shape, dtype=None):
    """The learner's result as a tensor, checked to have ``shape``."""
    assert got is not None, "your function returns nothing"
    got = torch.as_tensor(got, dtype=dtype)
    assert got.shape == shape, f"shape {tuple(got.shape)}, expected {tuple(shape)}"
    return got


def close(got, want) -> bool:
    """``got`` equals ``want`` up to rounding; None only where ``want`` is None."""
    if got is None or want is None:
        return got is want
    return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)


@functools.cache
def smollm():
    """SmolLM2 with its real weights, and the course's ``Llama`` on them: loaded once."""
    loaded = models.load("smollm2-135m")
    return loaded, Llama.from_hf(loaded.model)
