"""The invariant the whole course rests on, first for no batching at all: our forward, run by the
sequential engine, says exactly what Hugging Face ``generate`` says (greedy, float32, CPU)."""
import torch

from course_lib.engines import SequentialEngine
from course_lib.requests import chat_workload

N_PROMPTS, NEW_TOKENS = 12, 24


def hf_greedy(loaded, prompt, max_new_tokens):
    out = loaded.model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=loaded.model.config.eos_token_id)
    return out[0, len(prompt):].tolist()


def test_sequential_engine_equals_hf_generate_on_chat_prompts(smollm):
    requests = chat_workload(smollm.tokenizer, n=N_PROMPTS, max_new_tokens=NEW_TOKENS)
    log = SequentialEngine(smollm).run(requests)
    ended_by_eos = 0
    for req, rec in zip(requests, log.requests):
        expected = hf_greedy(smollm, req.prompt_tokens, NEW_TOKENS)
        assert rec.output_tokens == expected, req.id
        ended_by_eos += rec.finish_reason == "eos"
        assert rec.finish_reason == ("eos" if expected[-1] == smollm.model.config.eos_token_id
                                     else "length")
    assert 0 < ended_by_eos < N_PROMPTS, "the prompts should mix short and long answers"
