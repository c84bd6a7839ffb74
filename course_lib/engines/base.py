"""What every engine shares: requests in, a ``RunLog`` out. An engine refuses a bad request (with
the reason) and serves the others, on one clock that starts when ``run`` is called (``arrival_s``
counts from there). Subclasses write ``_serve(requests)``: the rule they teach."""
from __future__ import annotations

import time

from tqdm.auto import tqdm

from course_lib.measure.metrics import RequestRecord, RunLog
from course_lib.requests import RequestError, validate


class Engine:
    name = "engine"
    step_source = "engine"      # where the step log comes from: "engine", "streamer", "timestamps"
    clock = staticmethod(time.perf_counter)   # seconds; the simulator puts a virtual clock here
    sleep = staticmethod(time.sleep)

    def __init__(self, loaded, max_batch: int = 1):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.loaded, self.max_batch = loaded, max_batch
        self.hf = loaded.model
        self.eos = self.hf.config.eos_token_id
        self.max_context = self.hf.config.max_position_embeddings

    def now(self) -> float:
        return self.clock() - self._t0

    def wait_until(self, t: float):
        """Idle until the clock reads ``t`` (a request that has not arrived yet)."""
        delay = t - self.now()
        if delay > 0:
            self.sleep(delay)

    def prepare(self, requests):
        """Set up what a run of ``requests`` needs before a clock starts (the bench's warm-up)."""

    def run(self, requests, progress: bool = False) -> RunLog:
        ids = [r.id for r in requests]
        if len(set(ids)) != len(ids):
            twice = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"request ids must be unique: {twice!r} appears more than once")
        self.records, self.steps, good = {}, [], []
        for req in requests:
            rec = RequestRecord(req.id, req.arrival_s, len(req.prompt_tokens))
            self.records[req.id] = rec
            try:
                validate(req, self.max_context, getattr(self.hf.config, "vocab_size", None))
                good.append(req)
            except RequestError as e:
                rec.finish_reason, rec.error = "refused", str(e)
        good.sort(key=lambda r: r.arrival_s)
        self._bar = tqdm(total=len(good), desc=self.name, unit="req", disable=not progress,
                         leave=False)
        self._t0 = self.clock()
        try:
            self._serve(good)
        finally:
            self._bar.close()
        return RunLog(self.name, list(self.records.values()), self.steps, self.now(),
                      self.step_source)

    def finish(self, req, reason: str):
        self.records[req.id].finish(reason, self.now())
        self._bar.update(1)

    def is_done(self, req, token: int) -> str | None:
        """Why ``req`` stops after emitting ``token``: "eos", "length", or None to go on."""
        if token == self.eos and not req.ignore_eos:
            return "eos"
        return "length" if len(self.records[req.id].output_tokens) >= req.max_new_tokens else None

    def _serve(self, requests):
        raise NotImplementedError
