"""Choosing the next token, on the device that holds the logits (chapter 09).

Moving a batch's logits to the host (``B x vocab`` floats: 64 MB at B = 128 with a 128k
vocabulary) to pick one token per row would cost more than the step itself. So the choice is made
where the logits are, and only ``B`` integers travel back.

* ``temperature == 0``: greedy, the most likely token (``argmax``), what the invariance tests use.
* ``temperature > 0``: a sample from ``softmax(logits / temperature)``, drawn with the Gumbel-max
  trick: ``argmax(logits / T + g)`` with ``g = -log(-log(u))``, ``u`` uniform. It needs no
  sort, no cumulative sum and no host sync, so it also runs inside a CUDA graph (PyTorch keeps a
  captured graph's random numbers fresh at every replay).
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
