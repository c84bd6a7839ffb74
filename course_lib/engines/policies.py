"""The scheduler's admission policies: latency targets (chapter 08) and a free-block watermark
(chapter 09). Each has ``admit(seq, scheduler) -> bool``, asked before the head of the queue
joins; one may also ``shed(scheduler)``: refuse waiting requests for good.

Past its capacity a server that admits everything lets its queue grow, and every request misses
its targets. The ``AdmissionController`` queues a request while one more sequence would slow
decode steps past the TPOT target, and refuses it once it cannot meet its TTFT target (served late
is as useless as not served, and costs capacity), from step times predicted by a step-cost model
fitted online. It maximises *goodput*: requests served within both targets, per second."""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

from course_lib.measure.costmodel import StepCost, features
from course_lib.measure.metrics import Step

ONLINE = SimpleNamespace(device="online", bandwidth=float("inf"), flops=float("inf"))


@dataclass(frozen=True)
class SLO:
    """Latency targets, in seconds (None: no target)."""
    ttft_s: float | None = None
    tpot_s: float | None = None

    def __post_init__(self):
        for name in ("ttft_s", "tpot_s"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"the {name[:4].upper()} SLO must be > 0 seconds, got {v}")

    def met(self, record) -> bool:
        """Did a served request meet both targets?"""
        ttft, tpot = record.ttft_s, record.tpot_s
        return ((self.ttft_s is None or (ttft is not None and ttft <= self.ttft_s))
                and (self.tpot_s is None or tpot is None or tpot <= self.tpot_s))


class StepTimeModel:
    """Predicts step times: a ``StepCost`` refitted every ``refit_every`` steps to the last
    ``window`` steps of the engine's own log (the first fit needs ``min_steps`` steps; until then
    ``prior``, if given)."""
    min_steps, refit_every, window = 8, 16, 512

    def __init__(self, shape, dtype_bytes: int, prior: StepCost | None = None):
        self.shape, self.dtype_bytes, self.cost, self._fitted_at = shape, dtype_bytes, prior, 0

    def update(self, steps: list):
        n = len(steps)
        wait = self.refit_every if self._fitted_at else 0
        if n >= self.min_steps and n - self._fitted_at >= wait:
            # no peaks online: the weights' time goes into the fitted fixed cost per step
            self.cost = StepCost.fit_steps(steps[-self.window:], self.shape, self.dtype_bytes,
                                           ONLINE)
            self._fitted_at = n

    def predict(self, rows: int, tokens: int, attended: int, kv_read: int) -> float | None:
        if self.cost is None:
            return None
        x = features(self.shape, self.dtype_bytes, rows, tokens, attended, kv_read, rows)
        return self.cost.predict(x)


def admission_rule(waited_s: float, first_token_s: float, decode_step_s: float,
                   ttft_slo: float, tpot_slo: float) -> str:
    """``"refuse"`` what cannot meet the TTFT target even if admitted now, else ``"queue"`` what
    would slow decode steps past the TPOT target, else ``"admit"`` (seconds; no target: ``inf``)."""
    if waited_s + first_token_s > ttft_slo:
        return "refuse"
    return "queue" if decode_step_s > tpot_slo else "admit"


class AdmissionController:
    """Admit, queue or refuse (``rule``), from the SLO and the predicted step times. ``clock``:
    seconds since the run started (how long a request has waited)."""
    rule = staticmethod(admission_rule)

    def __init__(self, slo: SLO, model: StepTimeModel, clock=None):
        self.slo, self.model, self.clock = slo, model, clock
        self.admitted = set()      # ids admitted once: a preempted sequence is not judged again

    def step_time(self, pairs) -> float | None:
        """Predicted time of a step of ``(cached, new)`` tokens per sequence."""
        s = Step.of(0.0, 0.0, pairs)
        return self.model.predict(s.rows, s.slots, s.attended, s.kv_read)

    def decide(self, prompt_len: int, waited_s: float, contexts: list) -> tuple:
        """``("admit", "")``, ``("queue", why)`` or ``("refuse", why)`` for a ``prompt_len``-token
        prompt that has waited ``waited_s``, next to running sequences of ``contexts`` tokens."""
        # its first token: its prefill, next to one decode for each running sequence
        first = self.step_time([(c, 1) for c in contexts] + [(0, prompt_len)])
        if first is None:                               # no step times to predict from yet
            return "admit", ""
        ttft, tpot = self.slo.ttft_s or math.inf, self.slo.tpot_s or math.inf
        decodes = [(c, 1) for c in contexts + [prompt_len]]      # a decode step once it has joined
        step = self.step_time(decodes) if contexts and tpot < math.inf else 0.0
        verdict = self.rule(waited_s, first, step, ttft, tpot)
        if verdict == "refuse":
            return verdict, (f"would miss the TTFT target of {ttft:g} s: waited {waited_s:.3g} s, "
                             f"its first token needs {first:.3g} s more")
        return verdict, (f"one more sequence makes a decode step {step:.3g} s, over the TPOT "
                         f"target of {tpot:g} s") if verdict == "queue" else ""

    def _verdict(self, seq, scheduler) -> tuple:
        """``decide`` for a waiting sequence, next to the running ones."""
        return self.decide(len(seq.tokens), self.clock() - seq.req.arrival_s,
                           [len(s.tokens) for s in scheduler.running])

    def admit(self, seq, scheduler) -> bool:
        """May the head of the queue join the running sequences now?"""
        if seq.req.id not in self.admitted:
            if self._verdict(seq, scheduler)[0] != "admit":
                return False
            self.admitted.add(seq.req.id)
        return True

    def shed(self, scheduler) -> list:
        """``[(seq, why)]``: every waiting request that can no longer meet its TTFT target."""
        verdicts = [(seq, self._verdict(seq, scheduler)) for seq in scheduler.waiting
                    if seq.req.id not in self.admitted]
        return [(seq, f"request {seq.req.id!r} refused: {why}")
                for seq, (verdict, why) in verdicts if verdict == "refuse"]


class Watermark:
    """Admit only while ``fraction`` of the blocks stays free after the newcomer's prompt: the
    running sequences' room to grow, short of which they are preempted. Alone, always admitted."""

    def __init__(self, fraction: float):
        if not 0 <= fraction < 1:
            raise ValueError(f"watermark must be a fraction of the blocks in [0, 1), "
                             f"got {fraction}")
        self.fraction = fraction

    def admit(self, seq, scheduler) -> bool:
        blocks = scheduler.blocks
        return not scheduler.running or (blocks.n_free - blocks.blocks_needed(len(seq.tokens))
                                         >= self.fraction * blocks.n_blocks)
