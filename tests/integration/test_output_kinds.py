"""Gates that fit the output (Tolerance.output_kind): full int8 of a segmentation-like model and
an embedding model, measured in MNN's runtime against the fp32 .mnn on unlabelled images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mnnpipe.errors import StepFailed
from mnnpipe.runner import run_step

pytestmark = pytest.mark.integration

SIZE = 16


class _Segmenter(nn.Module):
    """A per-pixel classifier: [1, 3, 16, 16] -> 4 class scores per pixel, [1, 4, 16, 16]. No head
    bias, so each pixel's class follows its colour (not one class everywhere)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 4, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class _OutlierSegmenter(_Segmenter):
    """The same function class, but one feature channel is 1000x larger (and scaled back down in
    the next layer): fine in float, while a per-tensor int8 scale leaves the other channels ~0."""

    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():
            self.body[0].weight[0] *= 1000
            self.body[0].bias[0] *= 1000
            self.body[2].weight[:, 0] /= 1000


class _Embedder(nn.Module):
    """An image embedder: [1, 3, 16, 16] -> a 64-d vector whose features come in near-duplicate
    pairs (correlated features, as embedders have), so which one is largest is noise."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(32, 64, bias=False)
        with torch.no_grad():
            self.head.weight[32:] = self.head.weight[:32] * 1.001

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.body(x)).flatten(1))


def _to_mnn(model: nn.Module, d: Path) -> Path:
    from mnnpipe.engines.mnn import convert_onnx_to_mnn
    from mnnpipe.engines.onnx_export import export_onnx

    torch.manual_seed(0)
    export_onnx(model.eval(), (torch.rand(1, 3, SIZE, SIZE),), d / "model.onnx", input_names=["input"], dynamic_batch=False)
    convert_onnx_to_mnn(d / "model.onnx", d / "model.mnn")
    return d / "model.mnn"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("kinds")
    out = {}
    for kind, build in (("dense", _Segmenter), ("embedding", _Embedder), ("outlier", _OutlierSegmenter)):
        torch.manual_seed(0)
        (d / kind).mkdir()
        out[kind] = _to_mnn(build(), d / kind)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Smooth random colour images (blobs, not noise), unlabelled: calibration and evaluation sets."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    out = {}
    for name, n in (("calibration", 64), ("evaluation", 16)):
        coarse = rng.uniform(0, 255, size=(n, 4, 4, 3))
        x = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2) + rng.normal(0, 8, size=(n, SIZE, SIZE, 3))
        np.savez(d / f"{name}.npz", x=np.clip(x, 0, 255).astype(np.uint8))
        out[name] = d / f"{name}.npz"
    return out


def spec(model: Path, images: dict[str, Path], out: Path, kind: str | None, **overrides) -> dict:
    fidelity = {"max_abs_error": None, "min_cosine": 0.99, "min_top1_agreement": 0.95}
    if kind is not None:
        fidelity["output_kind"] = kind
    return {
        "model": {"uri": str(model)},
        "calibration": {"format": "npz", "uri": str(images["calibration"])},
        "evaluation": {"format": "npz", "uri": str(images["evaluation"])},
        "fidelity": fidelity,
        "output": str(out),
        **overrides,
    }


@pytest.mark.parametrize("kind", ["dense", "embedding"])
def test_good_int8_fails_top1_as_logits_and_passes_with_its_output_kind(kind, models, images, tmp_path, cache_dir):
    # As classification logits, an argmax over a whole map / an embedding flips on int8 noise.
    with pytest.raises(StepFailed, match=r"top-1 agreement .* < 0.95 .*measured: cosine 0\.99"):
        run_step("quantize", spec(models[kind], images, tmp_path / "as-logits", None), quiet=True)

    result = run_step("quantize", spec(models[kind], images, tmp_path / "out", kind), quiet=True)

    fid = result.quantized.fidelity
    assert fid.output_kind == kind and fid.top1_agreement is None
    assert fid.cosine > 0.99
    gated = fid.pixel_agreement if kind == "dense" else fid.neighbour_agreement
    assert gated >= 0.95 and 0 < fid.agreement_lower_bound <= gated
    assert fid.agreement_units == (16 * SIZE * SIZE if kind == "dense" else 16)
    assert (tmp_path / "out" / "model.mnn").exists()


def test_bad_int8_of_a_dense_model_fails_and_shows_every_metric(models, images, tmp_path, cache_dir):
    out = tmp_path / "out"

    with pytest.raises(StepFailed) as failed:
        run_step("quantize", spec(models["outlier"], images, out, "dense"), quiet=True)

    message = str(failed.value)
    for metric in ("cosine", "worst sample cosine", "max abs error", "mean rel error", "per-pixel agreement", "mean IoU",
                   "95% lower bound", "output kind dense"):
        assert metric in message, message
    assert not out.exists() or not any(out.iterdir())


def test_convert_verifies_a_dense_model_per_pixel(models, tmp_path, cache_dir):
    onnx = models["dense"].with_name("model.onnx")
    spec = {
        "model": {"uri": str(onnx), "format": "onnx"},
        "tolerance": {"output_kind": "dense"},
        "output": str(tmp_path / "out"),
    }

    result = run_step("convert", spec, quiet=True)

    assert result.fidelity.output_kind == "dense" and result.fidelity.top1_agreement is None
    assert result.fidelity.pixel_agreement == 1.0 and result.metrics["pixel_agreement"] == 1.0
    assert result.fidelity.agreement_units == 8 * SIZE * SIZE  # convert's 8 samples, every pixel


def test_weight_only_without_evaluation_set_gates_a_dense_model_per_pixel(models, tmp_path, cache_dir):
    onnx = models["dense"].with_name("model.onnx")
    spec = {
        "model": {"uri": str(onnx), "format": "onnx"},
        "mode": "weight-only",
        "num_samples": 4,
        "fidelity": {"output_kind": "dense", "min_cosine": 0.999, "min_top1_agreement": 0.99},
        "output": str(tmp_path / "out"),
    }

    result = run_step("quantize", spec, quiet=True)

    fid = result.quantized.fidelity
    assert fid.output_kind == "dense" and fid.pixel_agreement >= 0.99 and fid.agreement_units == 4 * SIZE * SIZE
