"""A fake model for scheduler tests: no weights, deterministic, milliseconds.

It "answers" a sequence whose last token is k with k - 1, then k - 2, ... down to EOS (2): a
request whose prompt ends in ``n + 2`` emits n tokens, the last of them EOS, however it is batched.
The schedule an engine produces with it depends on the scheduling rule alone.
"""
from types import SimpleNamespace

import torch
from transformers import LlamaConfig

from course_lib.model.llama import LlamaShape
from course_lib.requests import Request

EOS = 2
CONFIG = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                     max_position_embeddings=4096,
                     eos_token_id=EOS, pad_token_id=EOS, bos_token_id=1)


class FakeLlama:
    shape = LlamaShape.from_config(CONFIG)
    device = torch.device("cpu")
    dtype = torch.float32

    def hidden_states(self, tokens, positions, attn):
        return tokens.float()[..., None]

    def logits(self, hidden, float32=True):
        nxt = (hidden[..., 0].long() - 1).clamp(min=EOS)
        return torch.nn.functional.one_hot(nxt, self.shape.vocab_size).float()


LOADED = SimpleNamespace(model=SimpleNamespace(config=CONFIG))


def make_engine(cls, max_batch):
    return cls(LOADED, max_batch=max_batch, model=FakeLlama())


def req(name, n_out, prompt_len=3, arrival=0.0):
    """A request that emits ``n_out`` tokens, the last of them EOS."""
    return Request(name, [7] * (prompt_len - 1) + [n_out + 2], max_new_tokens=100,
                   arrival_s=arrival)
