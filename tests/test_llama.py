"""Our compact forward against the Hugging Face model it reads its weights from."""
import pytest
import torch

from course_lib.model.attention import PaddedAttention
from course_lib.model.kv_cache import ContiguousKVCache
from course_lib.requests import chat_workload


def prefill(model, prompts):
    """Left-padded prefill of several prompts; returns logits (B, T, vocab) and the cache."""
    B, T = len(prompts), max(len(p) for p in prompts)
    tokens = torch.zeros(B, T, dtype=torch.long)
    start = torch.tensor([T - len(p) for p in prompts])
    for r, p in enumerate(prompts):
        tokens[r, T - len(p):] = torch.tensor(p)
    cache = ContiguousKVCache(model.shape, B, T + 8)
    attn = PaddedAttention(cache, list(range(B)), start, torch.arange(T).expand(B, T))
    return model(tokens, attn.positions, attn), start


def test_logits_match_hf_on_one_prompt(smollm, smollm_ours):
    ids = chat_workload(smollm.tokenizer, n=2)[1].prompt_tokens
    ours, _ = prefill(smollm_ours, [ids])
    ref = smollm.model(torch.tensor([ids])).logits
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)


def test_left_padded_batch_gives_each_prompt_its_own_logits(smollm, smollm_ours):
    prompts = [r.prompt_tokens for r in chat_workload(smollm.tokenizer, n=4)]
    assert len({len(p) for p in prompts}) > 1, "the test needs prompts of different lengths"
    batched, start = prefill(smollm_ours, prompts)
    for r, p in enumerate(prompts):
        alone = smollm.model(torch.tensor([p])).logits[0]
        torch.testing.assert_close(batched[r, int(start[r]):], alone, rtol=1e-4, atol=1e-3)


def test_padding_never_produces_nan(smollm_ours):
    logits, _ = prefill(smollm_ours, [[5, 6, 7, 8, 9, 10], [11]])
    assert torch.isfinite(logits).all()


def test_rope_rejects_scaled_configs(smollm):
    from course_lib.model.llama import LlamaShape
    cfg = smollm.model.config.__class__(**{**smollm.model.config.to_dict(), "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    with pytest.raises(NotImplementedError, match="RoPE"):
        LlamaShape.from_config(cfg)
