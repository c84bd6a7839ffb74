"""A simulator that runs the course's own schedulers on a virtual clock, with a step-cost model
fitted to measured steps in place of the hardware. The cost of one forward pass, in seconds:

    t = weights / bandwidth + overhead + per_row x rows + per_byte x kv_bytes + per_flop x flops
        + per_pair x pairs + per_dense_pair x dense_pairs

The weights are read at the measured copy bandwidth (fixing them lets the cost move to a bigger
model). ``kv_bytes`` and ``flops``: the rest of what the step moves and computes
(``roofline.step_work``); ``rows``, its sequences (host work grows with them); ``pairs``, the
(query, key) pairs attention looks at; ``dense_pairs``, every query against every key of the
step, what one masked attention over packed sequences computes (the gather path: a step mixing
a prompt with decodes costs far more than its pairs). A step's time runs to the start of the
next (the host's work between steps, ``costmodel.with_host_time``). The coefficients are fitted,
none negative, to real runs on one device, one ``StepCost`` per attention path in a ``CostBook``.
``SimModel`` stands in for the model: it computes nothing, moves the clock on by each step's
predicted time and never answers EOS.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch

from course_lib.measure.costmodel import StepCost, features, run_name
from course_lib.measure.roofline import attended_pairs
from course_lib.model.attention import cu_seqlens
from course_lib.model.llama import LlamaShape
from course_lib.model.models import preset_shape
from course_lib.requests import Request

PATHS = ("padded", "gather", "flex", "kernel")


def path_of(engine: str, options: dict | None, cuda: bool = False) -> str:
    """Which attention path a run takes: ``padded`` for the padded engines, else the paged
    engine's attention as recorded, or the engine's default (on CUDA if ``cuda``)."""
    from course_lib.engines import REGISTRY, PagedEngine, resolve
    options = {k: v for k, v in (options or {}).items() if k not in ("model",)}
    _, spec, given = resolve(engine, options)
    if spec.cls is not PagedEngine:
        return "padded"
    if given.get("attention"):
        return given["attention"]
    if engine == "continuous":              # stored runs of the paged engine by its old name
        return "gather"
    return REGISTRY[engine].resolved_defaults(cuda)["attention"]


@dataclass
class CostBook:
    """One fitted ``StepCost`` per implementation path, all from one device."""
    paths: dict

    @property
    def cuda(self) -> bool:
        """Whether its costs are a GPU's: a CPU is named with its threads (``device_name``)."""
        return not any(c.device.endswith("threads)") for c in self.paths.values())

    def for_run(self, engine: str, options: dict | None) -> StepCost:
        path = path_of(engine, options, self.cuda)
        if path not in self.paths:
            raise ValueError(f"no cost model for the {path!r} path (have: "
                             f"{', '.join(self.paths)}); fit one to runs that took it")
        return self.paths[path]

    @classmethod
    def fit(cls, runs: list) -> "CostBook":
        groups = {}
        for r in runs:
            cuda = (r.get("device") or {}).get("type") == "cuda"
            groups.setdefault(path_of(r["engine"], r.get("engine_options"), cuda), []).append(r)
        return cls({path: StepCost.fit(rs, shape_of(rs[0]), dtype_bytes_of(rs[0]))
                    for path, rs in groups.items()})

    @classmethod
    def floor(cls, device: str, bandwidth: float, flops: float) -> "CostBook":
        return cls(dict.fromkeys(PATHS, StepCost.floor(device, bandwidth, flops)))

    def save(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps({k: asdict(c) for k, c in self.paths.items()}, indent=1))
        return path

    @classmethod
    def load(cls, path) -> "CostBook":
        """A saved book, or the one a validation fitted (``bench/simulator_validation.py``)."""
        book = json.loads(Path(path).read_text())
        return cls({k: StepCost(**v) for k, v in book.get("cost_book", book).items()})


# Cards to replay a workload on: memory in bytes, and the peaks the cost model is moved to. The
# A100's are its datasheet's (80GB SXM, dense BF16), not measurements, and its name says so.
NAMED_GPUS = {"A100 80GB (datasheet)": {"memory": 80e9, "bandwidth": 2.039e12, "flops": 312e12}}


# ---------------------------------------------------------------- the simulated model
@dataclass
class VirtualClock:
    """Simulated seconds: reading the clock costs nothing, sleeping jumps ahead."""
    t: float = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float):
        self.t += max(0.0, seconds)


class SimModel:
    """Stands in for ``Llama`` in an engine. Its ``shape`` is a tiny one, so that the engine's
    caches cost no memory; ``cost_shape`` is the model being simulated."""
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, shape: LlamaShape, dtype_bytes: int, cost: StepCost, clock: VirtualClock):
        self.cost_shape, self.dtype_bytes, self.cost, self.clock = shape, dtype_bytes, cost, clock
        # for engines that launch a step and complete it later (the paged engine): the simulated
        # GPU queues each step behind the one in flight and the host goes on, as on a real one;
        # ``gpu_free`` is when the last step queued ends. Other engines wait for every step.
        self.asynchronous, self.gpu_free = False, 0.0
        self.answer = 0 if shape.eos_token_id != 0 else 1          # never EOS
        self.shape = replace(shape, hidden=1, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=2,
                             vocab_size=2)

    def hidden_states(self, tokens, positions, attn):
        if tokens.dim() == 2:                 # a padded batch (B, T): every position computed
            rows = tokens.shape[0]
            kv_read = int(positions[:, 0].sum()) if tokens.shape[1] == 1 else 0
        else:                                 # packed: positions of each sequence's new tokens
            starts = attn.cu_seqlens[:-1]
            rows, kv_read = len(starts), int(positions[starts].sum())
        attended = int(attended_pairs(positions, 1).sum())     # each token after its position
        x = features(self.cost_shape, self.dtype_bytes, rows, tokens.numel(), attended, kv_read,
                     rows)
        if self.asynchronous:
            self.gpu_free = max(self.gpu_free, self.clock()) + self.cost.predict(x)
        else:
            self.clock.sleep(self.cost.predict(x))
        return torch.zeros(*tokens.shape, 1)

    def logits(self, hidden, float32=True):
        out = torch.zeros(*hidden.shape[:-1], 2)
        out[..., self.answer] = 1.0
        return out


class PackedPositions:
    """What the paged engine needs of its attention object when nothing is computed: the
    positions and ``cu_seqlens`` of the packed tokens (no index lists, no mask)."""

    def __init__(self, cache, seqs, device="cpu"):
        self.positions = torch.tensor([p for _, c, new in seqs for p in range(c, c + new)])
        self.cu_seqlens = torch.tensor(cu_seqlens(new for _, _, new in seqs))


def simulate(engine: str, requests: list, cost, shape: LlamaShape, dtype_bytes: int,
             max_batch: int, **options):
    """Run an engine of the course on ``requests`` with simulated steps; returns the engine and
    its ``RunLog``. Each request produces exactly ``max_new_tokens`` tokens. ``cost``: a
    ``StepCost``, or a ``CostBook`` (the model of the path this engine takes)."""
    from course_lib.engines import PagedEngine, make_engine, resolve
    if isinstance(cost, CostBook):
        cost = cost.for_run(engine, options)
    if resolve(engine, options)[1].cls is PagedEngine:    # nothing is computed: no kernels
        options.update(attention="gather", cuda_graphs=False, fused=False)
    if isinstance(options.get("slo"), dict):               # as a stored JSON holds it
        from course_lib.engines.policies import SLO
        options["slo"] = SLO(**options["slo"])
    clock = VirtualClock()
    config = SimpleNamespace(eos_token_id=shape.eos_token_id,
                             max_position_embeddings=shape.max_context)
    loaded = SimpleNamespace(model=SimpleNamespace(config=config))
    model = SimModel(shape, dtype_bytes, cost, clock)
    eng = make_engine(engine, loaded, max_batch=max_batch, model=model, **options)
    eng.clock, eng.sleep = clock, clock.sleep
    if hasattr(eng, "runner"):        # the step ends when the simulated GPU is done with it
        model.asynchronous, launch = True, eng.runner.launch

        def queued(plan):
            out = launch(plan)
            out.end = eng.now() + (model.gpu_free - clock())
            return out
        eng.runner.launch = queued
        eng.runner.attention_cls = PackedPositions
    return eng, eng.run([replace(r, ignore_eos=True) for r in requests])


def replay_requests(result: dict) -> list:
    """The served requests of a stored run, with their prompt lengths, arrivals and the number
    of tokens each produced (token ids do not matter to the cost)."""
    return [Request(r["id"], [1] * r["prompt_len"], max_new_tokens=r["n_output_tokens"],
                    arrival_s=r["arrival_s"], ignore_eos=True)
            for r in result["requests"] if r["finish_reason"] in ("eos", "length")]


def with_lengths(requests: list, log) -> list:
    """The requests, each asking for exactly as many tokens as it produced in ``log`` (a real
    run): how the simulator replays answers that ended at EOS."""
    produced = {r.id: len(r.output_tokens) for r in log.requests}
    return [replace(r, max_new_tokens=produced[r.id], ignore_eos=True) for r in requests
            if produced.get(r.id)]


def compare(measured: dict, simulated: dict) -> dict:
    """Relative error of a simulated run's metrics (``summarize``) against a measured run's."""
    def pick(m):
        return {"output_tokens_per_s": m["output_tokens_per_s"], "ttft_p50_s": m["ttft_s"]["p50"],
                "tpot_p50_s": m["tpot_s"]["p50"], "e2e_p50_s": m["e2e_s"]["p50"]}
    s, m = pick(simulated), pick(measured)
    return {k: {"simulated": s[k], "measured": m[k],
                "error": (s[k] - m[k]) / m[k] if m[k] else None} for k in s}


def replay(cost, result: dict, **changes):
    """Simulate a stored run: the same engine, options (``changes`` replace some), requests and
    arrivals. Returns the engine and its ``RunLog``."""
    options = dict(result.get("engine_options") or {})
    if "num_blocks" in options:              # the budget, as the run resolved it into blocks
        options.pop("kv_memory_bytes", None)
    return simulate(result["engine"], replay_requests(result), cost, shape_of(result),
                    dtype_bytes_of(result), result["max_batch"], **{**options, **changes})


def validate(cost, result: dict) -> dict:
    """Simulate a stored run (``replay``) and ``compare`` it with what was measured."""
    from course_lib.measure.metrics import summarize
    _, log = replay(cost, result)
    return {"run": run_name(result), **compare(result["metrics"], summarize(log))}


def runs_in(stored: dict) -> list:
    """The runs of a stored result (a ladder holds several) that the simulator can model: the
    course's own engines, with a step log."""
    runs = stored.get("runs", [stored])
    return [r for r in runs if not r["engine"].startswith("hf-") and r.get("steps")
            and not r.get("simulated")]


def shape_of(result: dict) -> LlamaShape:
    """The shape of a stored run's model preset."""
    return preset_shape(result["model"])


def dtype_bytes_of(result: dict) -> int:
    return getattr(torch, result["dtype"]).itemsize
