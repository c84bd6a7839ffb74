"""The paged engine's scheduler on its own (no model): the exact plans of small cases, worked
out by hand in the comments: decodes first, prompt chunks under ``max_num_batched_tokens``, the
newest sequence preempted when a decode finds no free block, and every request served in full;
the policies it asks."""
from course_lib.engines.block_manager import BlockManager
from course_lib.engines.policies import Watermark
from course_lib.engines.scheduler import Scheduler, chunk_sizes
from course_lib.engines.sequence import Sequence
from course_lib.requests import Request


def drive(scheduler, requests):
    """Run the scheduler as the engine does, every step's tokens at once (no overlap): the plans
    as ``[(id, tokens)]`` per step, whether each was decode-only, and each request's tokens."""
    for r in requests:
        scheduler.waiting.append(Sequence.of(r))
    plans, decode_only, out = [], [], {r.id: [] for r in requests}

    def on_token(seq, token):
        out[seq.req.id].append(token)
        return "length" if len(out[seq.req.id]) == seq.req.max_new_tokens else None
    while scheduler.waiting or scheduler.running:
        plan = scheduler.schedule()
        assert plan, "the scheduler found nothing to run"
        assert len(plans) < 50, "no progress"
        plans.append([(s.req.id, n) for s, n in plan])
        decode_only.append(plan.decode_only)
        places = scheduler.launched(plan)
        tokens = [50 + len(out[plan.seqs[i].req.id]) for i in plan.sampled]
        scheduler.postprocess(plan, places, tokens, on_token)
    return plans, decode_only, out


def request(name, prompt_len, max_new_tokens):
    return Request(name, list(range(3, 3 + prompt_len)), max_new_tokens=max_new_tokens)


def test_chunks_fill_the_budget_after_the_decodes():
    reqs = [request("a", 6, 2), request("b", 3, 2)]
    s = Scheduler(BlockManager(100, 4), max_batch=4, max_num_batched_tokens=4)
    plans, decode_only, out = drive(s, reqs)
    assert plans == [
        [("a", 4)],                 # a's prompt takes the whole budget; b, given 0, waits
        [("a", 2), ("b", 2)],       # a's last 2 (it samples its first token), b's first 2
        [("a", 1), ("b", 1)],       # a decodes; b's last prompt token is a step of one, too
        [("b", 1)],                 # a left at its last token
    ]
    assert decode_only == [False, False, True, True]
    assert out == {"a": [50, 51], "b": [50, 51]} and s.preemptions == 0
    assert s.blocks.n_free == 100 and not s.blocks.tables


def test_a_decode_without_a_block_preempts_the_newest_and_nobody_is_lost():
    # 4 blocks of 2 tokens: the two prompts fill them, and their second answer tokens need more
    reqs = [request("a", 3, 4), request("b", 3, 4)]
    s = Scheduler(BlockManager(4, 2), max_batch=4, max_num_batched_tokens=8)
    plans, decode_only, out = drive(s, reqs)
    assert plans == [
        [("a", 3), ("b", 3)],       # both prompts: 2 blocks each, none left
        [("a", 1), ("b", 1)],       # room in their second blocks
        [("a", 1), ("b", 2)],       # both blocks full: b, the newest, is preempted and frees 2;
                                    # a takes one, b comes back and recomputes what fits (2 of 5)
        [("a", 1)],                 # b's next 3 need 2 more blocks, 1 does not fit: nothing
        [("b", 3)],                 # a left at its last token: b's remaining recompute
        [("b", 1)],
    ]
    assert decode_only == [False, True, False, True, False, True]
    assert s.preemptions == 1
    assert out == {"a": [50, 51, 52, 53], "b": [50, 51, 52, 53]}     # nobody lost
    assert s.blocks.n_free == 4 and not s.blocks.tables and not s.running and not s.waiting


class Gate:
    """A policy that admits only the ids it is told to, and sheds the ids it is told to."""

    def __init__(self, allow, refuse=()):
        self.allow, self.refuse, self.asked = set(allow), set(refuse), []

    def admit(self, seq, scheduler):
        self.asked.append(seq.req.id)
        return seq.req.id in self.allow

    def shed(self, scheduler):
        return [(s, "no") for s in scheduler.waiting if s.req.id in self.refuse]


def test_policies_decide_who_joins_and_who_is_shed():
    gate = Gate(allow={"a"}, refuse={"c"})
    s = Scheduler(BlockManager(100, 4), max_batch=4, max_num_batched_tokens=100, policies=[gate])
    for r in (request("a", 3, 2), request("b", 3, 2), request("c", 3, 2)):
        s.waiting.append(Sequence.of(r))
    assert [(seq.req.id, why) for seq, why in s.shed()] == [("c", "no")]
    plan = s.schedule()
    assert [(q.req.id, n) for q, n in plan] == [("a", 3)]
    assert gate.asked == ["a", "b"] and [q.req.id for q in s.waiting] == ["b"]   # b stays in line


def test_the_watermark_keeps_room_to_grow_but_admits_a_sequence_alone():
    plans = {}
    for policies in ([], [Watermark(0.5)]):
        s = Scheduler(BlockManager(10, 4), max_batch=4, max_num_batched_tokens=100,
                      policies=policies)
        s.waiting.append(Sequence.of(request("a", 32, 4)))
        first = s.schedule()        # alone, a is admitted though it leaves 2 of 10 blocks free
        s.launched(first)
        s.waiting.append(Sequence.of(request("b", 4, 2)))
        plans[bool(policies)] = [[(q.req.id, n) for q, n in p] for p in (first, s.schedule())]
    # a's decode takes a 9th block; b's prompt would leave 0 free, under the watermark's 5
    assert plans[True] == [[("a", 32)], [("a", 1)]]
    assert plans[False] == [[("a", 32)], [("a", 1), ("b", 4)]]


def test_chunk_sizes_fill_the_budget_in_order():
    assert chunk_sizes([5, 3, 2], 6) == [5, 1, 0]
    assert chunk_sizes([2, 2], float("inf")) == [2, 2]
