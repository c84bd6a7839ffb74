"""Checks for the notebooks' exercises. Each ``check_*`` calls the learner's function on fresh
inputs, compares with the course's reference, prints one line when it is right and raises
``AssertionError`` (with a hint) when it is not."""
from __future__ import annotations

import math
import random

import torch
from transformers import LlamaConfig

from . import models
from .kv_cache import kv_bytes_per_token
from .llama import LlamaShape, rms_norm


def _ok(msg):
    print(f"✓ {msg}")


def _configs():
    return {name: LlamaConfig(**p.config) for name, p in models.PRESETS.items()}


# ---------------------------------------------------------------- chapter 00
def check_rms_norm(fn):
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    for shape in [(5, 16), (2, 3, 64), (576,)]:
        x = torch.randn(*shape, generator=g) * 3
        w = torch.rand(shape[-1], generator=g) + 0.5
        got = fn(x, w, 1e-5)
        assert got is not None, "your function returns nothing"
        assert got.shape == x.shape, f"shape {tuple(got.shape)}, expected {tuple(x.shape)}"
        want = rms_norm(x, w, 1e-5)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (
            "values differ: divide x by sqrt(mean(x**2 over the last dimension) + eps), "
            "then multiply by the weight")
    _ok("rms_norm matches the model's normalisation")


def check_kv_cache_bytes(fn):
    for name, cfg in _configs().items():
        shape = LlamaShape.from_config(cfg)
        for n, b in [(1, 4), (random.randint(2, 5000), 2)]:
            want = n * kv_bytes_per_token(shape, b)
            got = fn(cfg, n, b)
            assert got == want, (
                f"{name}, {n} tokens at {b} bytes: got {got}, expected {want}. Hint: K and V, "
                "every layer, num_key_value_heads (not num_attention_heads) x head_dim")
    _ok("kv_cache_bytes is right for every preset (grouped-query attention included)")


# ---------------------------------------------------------------- chapter 01
def check_decode_intensity(fn):
    for n_params, bpp, batch in [(7e9, 2, 1), (7e9, 2, 8), (135e6, 4, 64), (1.2e9, 1, 3)]:
        want = 2 * n_params * batch / (n_params * bpp)
        got = fn(n_params, bpp, batch)
        assert got is not None and math.isclose(got, want, rel_tol=1e-9), (
            f"n_params={n_params:g}, bytes_per_param={bpp}, batch={batch}: got {got}, expected "
            f"{want:g}. Hint: 2 FLOPs per parameter per token; the weights are read once per step")
    _ok("decode_intensity: FLOPs per byte grow with the batch, bytes do not")


def check_crossover_batch(fn):
    for flops, bw, bpp in [(312e12, 2.0e12, 2), (989e12, 3.35e12, 2), (200e9, 30e9, 4),
                           (100e12, 1e12, 1)]:
        want = math.ceil(flops / bw * bpp / 2)
        got = fn(flops, bw, bpp)
        assert got == want, (
            f"peak {flops:g} FLOP/s, {bw:g} B/s, {bpp} bytes/param: got {got}, expected {want}. "
            "Hint: the smallest whole batch whose intensity reaches the ridge (peak FLOP/s over "
            "bandwidth)")
    _ok("crossover_batch: below it decode is memory-bound, above it compute-bound")
