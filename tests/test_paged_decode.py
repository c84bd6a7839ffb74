"""The paged decode kernel (chapter 09) and its reference. The reference is checked against the
packed, paged attention of chapters 05-07 on the CPU. The Triton kernel is checked against the
reference on fresh random inputs (``paged_decode.selfcheck``): on a GPU in bf16, and on the CPU in
Triton's interpreter (in a subprocess, because the interpreter must be chosen before Triton is
imported)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from course_lib.kernels.paged_decode import (
    SELFCHECK_SHAPE,
    DecodeAttention,
    n_splits,
    paged_decode_reference,
    random_decode_step,
    selfcheck,
)
from course_lib.model.attention import PagedAttention

SHAPE = SELFCHECK_SHAPE


def test_the_reference_is_the_packed_paged_attention_of_a_decode_step():
    cache, q, tables, lengths = random_decode_step(SHAPE)
    ref = paged_decode_reference(q, cache.k[0], cache.v[0], tables, lengths, cache.block_size)
    # the same step through chapter 05-07's attention: the new token is the last of each sequence,
    # already in the cache, so write it back unchanged
    seqs = [(b, n - 1, 1) for b, n in enumerate(lengths.tolist())]
    attn = PagedAttention(cache, seqs)
    slots = attn.slots
    k_new, v_new = cache.k[0][:, slots].transpose(0, 1), cache.v[0][:, slots].transpose(0, 1)
    torch.testing.assert_close(attn(0, q, k_new, v_new), ref, rtol=1e-5, atol=1e-5)
    # and through chapter 09's decode attention (the reference on the CPU), which also writes
    torch.testing.assert_close(DecodeAttention.of(cache, seqs)(0, q, k_new, v_new), ref)


def test_splits_keep_the_gpu_busy_and_vanish_at_large_batch():
    assert n_splits(1, 8, 1024, 64) == 16            # one sequence: its context cut in 16
    assert n_splits(8, 8, 1024, 64) == 8
    assert n_splits(64, 8, 1024, 64) == 1            # 512 programs without splitting
    assert n_splits(1, 8, 100, 64) == 2              # never a split shorter than a tile
    assert n_splits(64, 8, 1024, 64, longest_split=256) == 4     # a long context: 4 programs
    assert n_splits(1, 8, 1024, 64, longest_split=256) == 16     # never fewer than without it


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the bf16 test runs the real kernel "
                    "(and older Tritons' interpreters fail there with numpy 2)")
def test_the_triton_kernel_in_the_interpreter():
    r = subprocess.run([sys.executable, "-m", "course_lib.kernels.paged_decode"],
                       capture_output=True, text=True, env=dict(os.environ, TRITON_INTERPRET="1"),
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 5 and {row["splits"] > 1 for row in rows} == {True, False}   # both grids
    assert rows[-1]["knobs"] == {"longest_split": 32} and rows[-1]["splits"] > 1   # 256 split
    for row in rows:
        assert row["all_written"], f"every output element must be written: {row}"
        assert row["max_abs_error"] < 1e-5, row


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_triton_kernel_on_the_gpu_in_bf16():
    for row in selfcheck(SHAPE, cases=((1, 16), (8, 16), (64, 7), (256, 16)), device="cuda",
                         dtype=torch.bfloat16):
        assert row["all_written"], f"every output element must be written: {row}"
        assert row["relative_error"] < 1e-2, row


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_every_launch_takes_the_library_s_launch_settings(monkeypatch):
    """``TRITON_LAUNCH`` (warps, pipeline stages) reaches the kernel unless a call sets its own: a
    setting only written down would leave every launch at Triton's defaults."""
    from course_lib.kernels import paged_decode as pd
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(kwargs)
    monkeypatch.setattr(pd, "_paged_decode_kernel", Recorder())
    monkeypatch.setattr(pd, "_combine_kernel", Recorder())
    cache, q, tables, lengths = random_decode_step(SHAPE, B=3)
    pd.paged_decode(q, cache.k[0], cache.v[0], tables, lengths, cache.block_size)
    assert launches and all(launches[0][k] == v for k, v in pd.TRITON_LAUNCH.items())
    launches.clear()
    pd.paged_decode(q, cache.k[0], cache.v[0], tables, lengths, cache.block_size, num_stages=1)
    assert launches[0]["num_stages"] == 1
