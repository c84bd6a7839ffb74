"""Batching must not change what the model says: every engine, at several batch sizes and with
requests arriving over time, gives every request exactly the tokens that Hugging Face
``generate`` gives for that prompt alone (greedy, float32, CPU)."""
import pytest
import torch

from course_lib.engines import make_engine
from course_lib.requests import chat_workload, poisson_arrivals

N_PROMPTS, NEW_TOKENS = 32, 16
# FlexAttention on the CPU runs an unfused reference of itself, over the whole cache: fewer
# prompts (still enough to chunk, and to preempt in 40 blocks)
FLEX_PROMPTS = 12


@pytest.fixture(scope="module")
def requests(smollm):
    return chat_workload(smollm.tokenizer, n=N_PROMPTS, max_new_tokens=NEW_TOKENS)


@pytest.fixture(scope="module")
def expected(smollm, requests):
    out = {}
    for r in requests:
        ids = smollm.model.generate(torch.tensor([r.prompt_tokens]), max_new_tokens=NEW_TOKENS,
                                    do_sample=False, pad_token_id=smollm.model.config.eos_token_id)
        out[r.id] = ids[0, len(r.prompt_tokens):].tolist()
    return out


@pytest.mark.parametrize("engine,max_batch,arrival_rate,options", [
    ("static", 4, None, {}), ("static", 16, None, {}),
    ("dynamic", 8, None, {}), ("dynamic", 16, 40.0, {}),
    ("continuous", 4, None, {}), ("continuous", 16, None, {}), ("continuous", 8, 40.0, {}),
    # packed steps under a token budget (chunked prefill), paged KV-cache
    ("continuous", 8, None, {"max_num_batched_tokens": 24, "block_size": 16}),
    # a cache too small for the batch: sequences are preempted and recomputed
    ("continuous", 16, None, {"block_size": 8, "num_blocks": 40}),
    # the same two, with FlexAttention reading the blocks in place (the CUDA path's attention)
    ("continuous", 8, None, {"max_num_batched_tokens": 24, "block_size": 16, "attention": "flex"}),
    ("continuous", 16, None, {"block_size": 8, "num_blocks": 40, "attention": "flex"}),
    # chapter 09's fast path: decodes through the decode buffers (the kernel's reference on the
    # CPU), prefill chunks through FlexAttention
    ("continuous", 8, None,
     {"max_num_batched_tokens": 24, "block_size": 16, "attention": "kernel"}),
    ("continuous", 16, None, {"block_size": 8, "num_blocks": 40, "attention": "kernel"}),
])
def test_engine_says_what_hf_generate_says_alone(smollm, requests, expected, engine, max_batch,
                                                 arrival_rate, options):
    reqs = poisson_arrivals(requests, arrival_rate, seed=1) if arrival_rate else requests
    if options.get("attention") == "flex":
        reqs = reqs[:FLEX_PROMPTS]
    runner = make_engine(engine, smollm, max_batch=max_batch, **options)
    log = runner.run(reqs)
    if "num_blocks" in options:
        assert runner.preemptions > 0, "the test should exercise preemption"
    wrong = [r.id for r in log.requests if r.output_tokens != expected[r.id]]
    assert not wrong, f"{engine} at B={max_batch} changed the answer of {wrong}"
    assert {r.finish_reason for r in log.requests} == {"eos", "length"}
    assert max(s.rows for s in log.steps) <= max_batch
