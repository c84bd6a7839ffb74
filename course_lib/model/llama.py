"""The course's compact Llama forward pass over a Hugging Face model's weights. Shapes are
comments, ``...`` any leading dimensions (a padded batch ``(B, T)`` or a packed one ``(N,)``).
All but attention works token by token; attention, where tokens meet, is *passed in*: it owns
the KV-cache and knows the batch's layout (``course_lib.model.attention``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F


@dataclass
class LlamaShape:
    vocab_size: int
    hidden: int
    intermediate: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float
    eps: float
    eos_token_id: int
    max_context: int

    @classmethod
    def from_config(cls, c) -> "LlamaShape":
        rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise NotImplementedError("only the default RoPE is implemented (no rope scaling)")
        theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
        eos = c.eos_token_id[0] if isinstance(c.eos_token_id, (list, tuple)) else c.eos_token_id
        return cls(c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers,
                   c.num_attention_heads, c.num_key_value_heads,
                   getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                   float(theta), float(c.rms_norm_eps), int(eos), int(c.max_position_embeddings))


def matmul_params_per_token(shape) -> int:
    """Weights every token multiplies by: the layers' projections (no embedding, no head)."""
    s = shape
    q, kv = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    return s.n_layers * (s.hidden * (q + 2 * kv) + q * s.hidden + 3 * s.hidden * s.intermediate)


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor   # (hidden,)
    wq: torch.Tensor          # (n_heads * head_dim, hidden)
    wk: torch.Tensor          # (n_kv_heads * head_dim, hidden)
    wv: torch.Tensor          # (n_kv_heads * head_dim, hidden)
    wo: torch.Tensor          # (hidden, n_heads * head_dim)
    mlp_norm: torch.Tensor    # (hidden,)
    w_gate: torch.Tensor      # (intermediate, hidden)
    w_up: torch.Tensor        # (intermediate, hidden)
    w_down: torch.Tensor      # (hidden, intermediate)
    wqkv: torch.Tensor | None = None        # wq, wk, wv stacked (``stack``): one matmul
    w_gate_up: torch.Tensor | None = None   # w_gate, w_up stacked: one matmul instead of two

    def qkv(self, h):
        """The query, key and value projections of ``h``: (..., H*d), (..., Hkv*d) twice."""
        if self.wqkv is None:
            return F.linear(h, self.wq), F.linear(h, self.wk), F.linear(h, self.wv)
        return F.linear(h, self.wqkv).split([len(self.wq), len(self.wk), len(self.wv)], dim=-1)

    def gate_up(self, h):
        """SwiGLU's two input projections of ``h``: (..., intermediate) each."""
        if self.w_gate_up is None:
            return F.linear(h, self.w_gate), F.linear(h, self.w_up)
        return F.linear(h, self.w_gate_up).chunk(2, dim=-1)

    def stack(self):
        """Stack the projections that read the same input (a copy): fewer, larger matmuls."""
        if self.wqkv is None:
            self.wqkv = torch.cat([self.wq, self.wk, self.wv])
            self.w_gate_up = torch.cat([self.w_gate, self.w_up])


def rms_norm(x, weight, eps):
    """Scale each token's vector to unit root-mean-square, then by a learned weight."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(x, delta, weight, eps):
    """``x + delta`` (the residual add; ``delta=None``: none) and its RMSNorm, for fusing."""
    if delta is not None:
        x = x + delta
    return x, rms_norm(x, weight, eps)


def rope_frequencies(head_dim, theta, device=None):
    """The rotation speed of each pair of dimensions: theta^(-2i/d), i = 0 .. d/2 - 1."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)


def rope_cos_sin(positions, inv_freq, dtype):
    """cos and sin of the rotation angles, (..., head_dim), for integer positions (...)."""
    angles = positions.float()[..., None] * inv_freq          # (..., head_dim / 2)
    angles = torch.cat([angles, angles], dim=-1)              # (..., head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate pairs (x_i, x_{i + d/2}) of each head by the position's angles. x: (..., heads, d)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[..., None, :] + rotated * sin[..., None, :]


def rope_qk(q, k, cos, sin):
    """RoPE on a step's queries and keys."""
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def silu_mul(gate, up):
    """SwiGLU's gate: ``silu(gate) * up``."""
    return F.silu(gate) * up


class ElementwiseOps(NamedTuple):
    """The layer's elementwise work; ``rope_qk_store`` (optional) also writes K, V to the cache."""
    add_rms_norm: Callable
    rope_qk: Callable
    silu_mul: Callable
    rope_qk_store: Callable | None = None


REFERENCE_OPS = ElementwiseOps(add_rms_norm, rope_qk, silu_mul)


class Llama:
    """A Llama decoder over weights borrowed (not copied) from a Hugging Face model. ``ops``: the
    PyTorch functions above, or fused Triton kernels (``course_lib.kernels.fused.OPS``)."""

    def __init__(self, shape: LlamaShape, embed, layers, final_norm, lm_head):
        self.shape, self.embed, self.layers = shape, embed, layers
        self.final_norm, self.lm_head = final_norm, lm_head
        self.inv_freq = rope_frequencies(shape.head_dim, shape.rope_theta, embed.device)
        self.ops = REFERENCE_OPS

    @property
    def fused(self) -> bool:
        return self.ops is not REFERENCE_OPS

    def use_ops(self, ops: ElementwiseOps):
        """Do the elementwise work with ``ops``; any but the references stack the projections."""
        self.ops = ops
        for w in self.layers:
            if self.fused:
                w.stack()
            else:
                w.wqkv = w.w_gate_up = None

    @classmethod
    def from_hf(cls, hf_model) -> "Llama":
        s = dict(hf_model.state_dict())
        shape = LlamaShape.from_config(hf_model.config)
        names = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                 "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
                 "mlp.down_proj")                                  # in LayerWeights' order
        layers = [LayerWeights(*(s[f"model.layers.{i}.{n}.weight"] for n in names))
                  for i in range(shape.n_layers)]
        embed = s["model.embed_tokens.weight"]
        return cls(shape, embed, layers, s["model.norm.weight"], s.get("lm_head.weight", embed))

    @property
    def device(self):
        return self.embed.device

    @property
    def dtype(self):
        return self.embed.dtype

    @torch.inference_mode()
    def hidden_states(self, tokens, positions, attn):
        """tokens, positions: (...) integers -> final hidden states (..., hidden)."""
        s = self.shape
        add_norm, rope, gate, rope_qk_store = self.ops
        # RoPE that also writes the keys and values into the cache: two kernels fewer per layer
        store = rope_qk_store is not None and getattr(attn, "attend", None) is not None
        x = F.embedding(tokens, self.embed)                                   # (..., hidden)
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)
        norms = [w.attn_norm for w in self.layers[1:]] + [self.final_norm]    # after each layer
        x, h = add_norm(x, None, self.layers[0].attn_norm, s.eps)             # h = the norm of x
        for i, w in enumerate(self.layers):
            q, k, v = (t.unflatten(-1, (n, s.head_dim)) for t, n in          # (..., heads, d)
                       zip(w.qkv(h), (s.n_heads, s.n_kv_heads, s.n_kv_heads)))
            if store:
                q = rope_qk_store(q, k, v, cos, sin, attn.cache.k[i], attn.cache.v[i], attn.slots,
                                  rows=getattr(attn, "q_rows", None))
                o = attn.attend(i, q)
            else:
                q, k = rope(q, k, cos, sin)
                o = attn(i, q, k, v)                                          # (..., H, d)
            x, h = add_norm(x, F.linear(o.flatten(-2), w.wo), w.mlp_norm, s.eps)  # x += attention
            mlp = F.linear(gate(*w.gate_up(h)), w.w_down)                       # SwiGLU
            x, h = add_norm(x, mlp, norms[i], s.eps)                          # x += MLP
        return h

    def logits(self, hidden, float32: bool = True):
        """(..., hidden) -> (..., vocab), in float32 (or the model's dtype: enough for argmax)."""
        out = F.linear(hidden, self.lm_head)
        return out.float() if float32 else out

    def __call__(self, tokens, positions, attn):
        return self.logits(self.hidden_states(tokens, positions, attn))
