"""Better full int8: a model larger in int8 than in fp32 is warned about and refused under
max_size_ratio; calibration_ladder auto falls through settings that crash and keeps the best."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mnnpipe.errors import InputError, StepFailed
from mnnpipe.runner import run_step

pytestmark = pytest.mark.integration


def _mnn(model: nn.Module, shape: tuple[int, ...], d: Path) -> Path:
    from mnnpipe.engines.mnn import convert_onnx_to_mnn
    from mnnpipe.engines.onnx_export import export_onnx

    export_onnx(model.eval(), (torch.rand(*shape),), d / "m.onnx", input_names=["input"], dynamic_batch=False)
    convert_onnx_to_mnn(d / "m.onnx", d / "m.mnn")
    return d / "m.mnn"


def _tensors(path: Path, shape: tuple[int, ...], n: int, seed: int) -> Path:
    np.savez(path, x=np.random.default_rng(seed).uniform(0, 1, size=(n, *shape[1:])).astype(np.float32))
    return path


def _spec(model: Path, calib: Path, ev: Path, out: Path, **overrides) -> dict:
    return {
        "model": {"uri": str(model)},
        "calibration": {"format": "npz", "uri": str(calib)},
        "evaluation": {"format": "npz", "uri": str(ev)},
        "fidelity": {"output_kind": "other", "max_abs_error": None, "min_cosine": 0.99},
        "output": str(out),
        **overrides,
    }


def test_int8_larger_than_fp32_is_warned_about_and_refused_under_max_size_ratio(tmp_path, cache_dir, caplog):
    torch.manual_seed(0)
    shape = (1, 3, 8, 8)
    tiny = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1))
    model = _mnn(tiny, shape, tmp_path)
    calib, ev = _tensors(tmp_path / "c.npz", shape, 16, 0), _tensors(tmp_path / "e.npz", shape, 8, 1)

    with caplog.at_level(logging.WARNING, logger="mnnpipe"):
        result = run_step("quantize", _spec(model, calib, ev, tmp_path / "warned"), quiet=True)

    assert result.size_ratio > 1.0
    assert len(result.warnings) == 1 and "LARGER than the fp32 .mnn" in result.warnings[0]
    assert "LARGER than the fp32 .mnn" in caplog.text

    out = tmp_path / "refused"
    with pytest.raises(StepFailed, match=r"x the fp32 .mnn .* > max_size_ratio 1.0; nothing published"):
        run_step("quantize", _spec(model, calib, ev, out, max_size_ratio=1.0), quiet=True)
    assert not (out / "model.mnn").exists()


class _MeanPooled(nn.Module):
    """Conv features averaged over H and W (ONNX ReduceMean, which crashes MNN 3.6.1's KL calibration)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_ladder_falls_through_a_kl_crash_to_ema_and_reports_every_attempt(tmp_path, cache_dir):
    torch.manual_seed(0)
    shape = (1, 3, 8, 8)
    model = _mnn(_MeanPooled(), shape, tmp_path)
    calib, ev = _tensors(tmp_path / "c.npz", shape, 32, 0), _tensors(tmp_path / "e.npz", shape, 8, 1)

    # Without the ladder, KL on ReduceMean is refused before the quantizer can segfault.
    with pytest.raises(InputError, match="ReduceMean"):
        run_step("quantize", _spec(model, calib, ev, tmp_path / "kl"), quiet=True)

    result = run_step("quantize", _spec(model, calib, ev, tmp_path / "out", calibration_ladder="auto", calibration_samples=8), quiet=True)

    attempts = result.calibration_attempts
    assert attempts[0].setting.startswith("KL") and attempts[0].outcome == "refused" and "ReduceMean" in attempts[0].detail
    assert [a.setting for a in attempts[1:]] == [
        "EMA batch_size 1, 8 samples",
        "EMA batch_size 1, 32 samples",
        "EMA batch_size 1, 8 samples, feature_clamp_value 100",
    ]
    assert any(a.outcome == "passed" for a in attempts)
    for a in attempts[1:]:
        assert a.cosine is not None and a.seconds > 0
    assert result.quantized.cosine == max(a.cosine for a in attempts if a.outcome == "passed")  # the best is kept
    assert result.quantized.cosine >= 0.99 and result.op_types.get("Convolution[int8]", 0) >= 2
    assert result.metrics["calibration_attempt_0_passed"] == 0.0 and "calibration_attempt_1_seconds" in result.metrics
    assert (tmp_path / "out" / "model.mnn").exists()
