"""The engines of the course, by the name the bench CLI knows them by."""
from .continuous import ContinuousEngine
from .dynamic import DynamicEngine
from .hf import HFContinuousEngine, HFGenerateEngine
from .sequential import SequentialEngine
from .static import StaticEngine

ENGINES = {
    "sequential": SequentialEngine,
    "static": StaticEngine,
    "dynamic": DynamicEngine,
    "continuous": ContinuousEngine,
    "hf-generate": HFGenerateEngine,
    "hf-cb": HFContinuousEngine,
}


def make_engine(name: str, loaded, **options):
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; the engines are: {', '.join(ENGINES)}")
    return ENGINES[name](loaded, **options)
