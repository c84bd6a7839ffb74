"""The engines of the course, by the name the bench CLI knows them by."""
from course_lib.engines.continuous import ContinuousEngine
from course_lib.engines.dynamic import DynamicEngine
from course_lib.engines.hf import HFContinuousEngine, HFGenerateEngine
from course_lib.engines.paged import PagedEngine
from course_lib.engines.sequential import SequentialEngine
from course_lib.engines.static import StaticEngine

ENGINES = {
    "sequential": SequentialEngine,
    "static": StaticEngine,
    "dynamic": DynamicEngine,
    "continuous": ContinuousEngine,
    "hf-generate": HFGenerateEngine,
    "hf-cb": HFContinuousEngine,
}


PAGED_OPTIONS = ("max_num_batched_tokens", "block_size", "num_blocks", "attention", "kv_memory_bytes",
                 "slo", "step_cost", "cuda_graphs", "temperature", "trace_blocks", "watermark", "fused")


def make_engine(name: str, loaded, **options):
    """An engine by name. ``continuous`` with any of ``max_num_batched_tokens``, ``block_size``,
    ``num_blocks``, ``kv_memory_bytes``, ``attention``, ``slo``, ``cuda_graphs``, ``temperature``,
    ``trace_blocks``, ``watermark`` or ``fused`` is the packed, chunked, paged engine of chapters 05-09."""
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; the engines are: {', '.join(ENGINES)}")
    paged = {k: options.pop(k) for k in PAGED_OPTIONS if options.get(k) is not None}
    for k in PAGED_OPTIONS:
        options.pop(k, None)
    if paged:
        if name != "continuous":
            raise ValueError(f"{', '.join(paged)} only apply to the continuous engine")
        return PagedEngine(loaded, **options, **paged)
    return ENGINES[name](loaded, **options)
