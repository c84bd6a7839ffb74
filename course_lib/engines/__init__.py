"""The course's engines by name, with their defaults (for the bench, ladder, simulator, notebooks).

* sequential, static, dynamic, continuous: the padded engines of chapters 02-04.
* chunked (chapter 05: packed steps under a token budget, a cache with room for every request),
  paged (chapter 07: a bounded cache, ``num_blocks`` or ``kv_memory_bytes``, and preemption) and
  fast (chapter 09: the Triton decode kernel, CUDA graphs, fused kernels, overlap, a watermark,
  each on where CUDA is) are one class, ``PagedEngine``, with different defaults.
* hf-generate, hf-cb: Hugging Face's ``generate`` on static batches, and its continuous batching.
* vllm: vLLM's offline ``LLM.generate`` in a process of its own (CUDA and vLLM only).

An option given as None takes the engine's default. ``continuous`` given an option of the paged
engine builds ``PagedEngine`` with that class's own defaults, named by ``legacy_name`` (an alias
the simulator and stored runs use)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from course_lib.engines.continuous import ContinuousEngine
from course_lib.engines.dynamic import DynamicEngine
from course_lib.engines.hf import HFContinuousEngine, HFGenerateEngine
from course_lib.engines.paged import PagedEngine
from course_lib.engines.sequential import SequentialEngine
from course_lib.engines.static import StaticEngine
from course_lib.engines.vllm import VllmEngine


class EngineOptionError(ValueError):
    """An unknown engine, an option it does not take, or an option value it refuses."""


def _cuda_on(value_on, value_off):
    """A default that depends on whether the engine's model is on a CUDA device."""
    return lambda cuda: value_on if cuda else value_off


@dataclass(frozen=True)
class EngineSpec:
    """A registered engine: its class and default options (values, or functions of ``cuda``)."""
    name: str
    cls: type
    defaults: dict = field(default_factory=dict)

    @property
    def options(self) -> tuple:
        """The options it takes: its constructor's keywords, ``max_batch`` included."""
        params = inspect.signature(self.cls.__init__).parameters
        return tuple(p for p in params if p not in ("self", "loaded"))

    def resolved_defaults(self, cuda: bool) -> dict:
        return {k: v(cuda) if callable(v) else v for k, v in self.defaults.items()}


_PAGED = {"block_size": 16, "cuda_graphs": False, "fused": False, "overlap": False,
          "watermark": 0.0, "prefix_caching": False}
REGISTRY = {s.name: s for s in (
    EngineSpec("sequential", SequentialEngine),
    EngineSpec("static", StaticEngine),
    EngineSpec("dynamic", DynamicEngine),
    EngineSpec("continuous", ContinuousEngine),
    # the budget: prompts are cut into chunks, and decodes are never held back long
    EngineSpec("chunked", PagedEngine,
               {**_PAGED, "max_num_batched_tokens": 2048, "attention": "gather"}),
    # no budget (whole prompts per step: the chapter is about the cache); FlexAttention on CUDA
    EngineSpec("paged", PagedEngine, {**_PAGED, "attention": _cuda_on("flex", "gather")}),
    # the fastest budget chapter 09 measured (bench/FINDINGS.md)
    EngineSpec("fast", PagedEngine,
               {"max_num_batched_tokens": 16384, "block_size": 16, "attention": "kernel",
                "cuda_graphs": _cuda_on(True, False), "fused": _cuda_on(True, False),
                "overlap": _cuda_on(True, False), "watermark": _cuda_on(0.05, 0.0)}),
    EngineSpec("hf-generate", HFGenerateEngine),
    EngineSpec("hf-cb", HFContinuousEngine),
    EngineSpec("vllm", VllmEngine),
)}

ENGINES = {name: spec.cls for name, spec in REGISTRY.items()}

# the paged engine's options that the padded continuous engine lacks (given, they select it)
PAGED_OPTIONS = tuple(o for o in REGISTRY["chunked"].options
                      if o not in REGISTRY["continuous"].options)


def on_cuda(loaded, model=None) -> bool:
    """Whether an engine built on ``loaded`` (or on ``model`` in its place) runs on CUDA."""
    device = getattr(model, "device", None) or getattr(loaded.model, "device", None)
    return getattr(device, "type", str(device)) == "cuda"


def legacy_name(options: dict, attention: str) -> str:
    """What ``continuous`` with paged ``options`` is: ``fast`` when its (resolved) ``attention`` is
    the kernel, ``paged`` with a bounded cache, an attention or an SLO, else ``chunked``."""
    if attention == "kernel":
        return "fast"
    bounded = ("num_blocks", "kv_memory_bytes", "attention", "slo")
    if any(options.get(k) is not None for k in bounded):
        return "paged"
    return "chunked"


def resolve(name: str, options: dict) -> tuple:
    """``(engine name, spec, options)`` for ``make_engine``: unknown names and options refused
    with a ValueError that names them; None-valued options dropped (the engine's default)."""
    if name not in REGISTRY:
        raise EngineOptionError(f"unknown engine {name!r}; the engines are: {', '.join(REGISTRY)}")
    given = {k: v for k, v in options.items() if v is not None}
    spec = REGISTRY[name]
    if name == "continuous" and any(k in PAGED_OPTIONS for k in given):
        spec = REGISTRY["chunked"]              # the paged engine, with its own defaults
    unknown = [k for k in given if k not in spec.options]
    if unknown:
        raise EngineOptionError(f"engine {name!r} does not take {', '.join(map(repr, unknown))}; "
                                f"it takes: {', '.join(spec.options)}")
    return spec.name, spec, given


def make_engine(name: str, loaded, **options):
    """An engine by name, built on ``loaded`` with ``options`` (its constructor's keywords): one it
    does not take, or a value it refuses, raises ``EngineOptionError`` naming it."""
    _, spec, given = resolve(name, options)
    legacy = name == "continuous" and spec.cls is PagedEngine   # the alias: no defaults
    defaults = {} if legacy else spec.resolved_defaults(on_cuda(loaded, given.get("model")))
    if given.get("prefix_caching") and defaults.get("attention") == "flex":
        defaults["attention"] = "gather"            # flex cannot read shared blocks
    try:
        engine = spec.cls(loaded, **{**defaults, **given})
    except ValueError as e:                       # the engine refused a value: say which engine
        raise EngineOptionError(f"engine {spec.name!r}: {e}") from e
    engine.name = legacy_name(given, engine.attention) if legacy else spec.name
    return engine


def engine_settings(engine) -> dict:
    """The settings an engine resolved, as its result records them (paged and vllm engines)."""
    if isinstance(engine, PagedEngine):
        run = engine.runner
        out = {"max_num_batched_tokens": engine.max_num_batched_tokens,
               "block_size": engine.block_size, "attention": run.attention,
               "cuda_graphs": bool(run.cuda_graphs), "fused": bool(run.fused),
               "overlap": bool(run.overlap), "watermark": engine.watermark.fraction,
               "prefix_caching": engine.prefix_caching}
        if engine.num_blocks is not None:
            out["num_blocks"] = engine.num_blocks
        return out
    return dict(getattr(engine, "settings", None) or {})
