"""Choosing the next token on the device that holds the logits: only ``B`` integers travel
back to the host. ``temperature > 0`` samples ``softmax(logits / T)`` by the Gumbel-max trick,
``argmax(logits / T - log(-log(u)))``, ``u`` uniform: no sort, no host sync, CUDA-graph safe.
"""
from __future__ import annotations

import torch


def sample(logits, temperature: float = 0.0, generator=None):
    """``(..., vocab)`` logits -> ``(...)`` token ids (int64), on the logits' device."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(-1)
    u = torch.rand(logits.shape, device=logits.device, generator=generator)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
    return (logits.float() / temperature + gumbel).argmax(-1)
