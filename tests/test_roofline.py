import json

import pytest
import torch

from course_lib.measure import roofline


def test_peaks_are_measured_once_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    calls = []
    real = roofline._measure

    def counting(device, dtype):
        calls.append(dtype)
        return real(device, dtype)
    monkeypatch.setattr(roofline, "_measure", counting)
    p = roofline.measure_peaks("cpu", torch.float32)
    assert p.bandwidth > 1e8 and p.flops > 1e8 and p.ridge == p.flops / p.bandwidth
    again = roofline.measure_peaks("cpu", torch.float32)
    assert again == p and len(calls) == 1
    table = json.loads((tmp_path / "peaks.json").read_text())
    assert any("float32" in k for k in table)


def test_nvml_sampler_without_a_gpu_reports_nothing():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with roofline.NvmlSampler() as s:
        pass
    assert s.mean is None and s.samples == []
