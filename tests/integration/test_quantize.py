"""The quantize step end to end: real MNN quantizer and runtime on a briefly trained digits CNN."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mnnpipe.errors import InputError, SpecError, StepFailed
from mnnpipe.runner import run_step

pytestmark = pytest.mark.integration

GRAY = {"channels": "GRAY"}
CALIB = {"format": "sklearn-digits", "split": "train", "limit": 100, "preprocess": GRAY}
EVAL = {"format": "sklearn-digits", "split": "test", "preprocess": GRAY}


@pytest.fixture(scope="module")
def digits_models(tmp_path_factory) -> dict[str, Path]:
    """A digits_cnn trained for 4 epochs, as a state-dict and as an fp32 .mnn."""
    from mnnpipe.data import load_dataset
    from mnnpipe.engines.mnn import convert_onnx_to_mnn
    from mnnpipe.engines.onnx_export import export_onnx
    from mnnpipe.models import digits_cnn
    from mnnpipe.specs import DatasetRef
    from mnnpipe.train import FitConfig, fit

    d = tmp_path_factory.mktemp("digits")
    model = digits_cnn()
    fit(model, load_dataset(DatasetRef(**{**CALIB, "limit": None})), FitConfig(epochs=4, lr=3e-3, seed=0))
    torch.save(model.state_dict(), d / "model.pth")
    export_onnx(model, (torch.rand(1, 1, 8, 8),), d / "model.onnx", input_names=["input"], dynamic_batch=False)
    convert_onnx_to_mnn(d / "model.onnx", d / "model.mnn")
    return {"mnn": d / "model.mnn", "pth": d / "model.pth", "onnx": d / "model.onnx"}


def spec(models: dict[str, Path], out: Path, **overrides) -> dict:
    return {"model": {"uri": str(models["mnn"])}, "calibration": CALIB, "evaluation": EVAL, "output": str(out), **overrides}


def published(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) if out.exists() else []


def test_full_int8_within_budget_runs_int8_kernels_at_a_quarter_of_the_size(digits_models, tmp_path, cache_dir):
    out = tmp_path / "out"

    result = run_step("quantize", spec(digits_models, out, max_accuracy_drop=0.5), quiet=True)

    assert result.op_types.get("Convolution[int8]", 0) == 4  # 2 convs + 2 linear layers (1x1 convs in MNN)
    assert "Convolution" not in result.op_types  # nothing left in float
    assert result.size_ratio < 0.4
    assert result.size_bytes == (out / "model.mnn").stat().st_size
    assert result.fp32.accuracy > 0.9
    assert result.quantized.accuracy_drop_pp <= 0.5
    assert result.quantized.cosine > 0.999
    assert published(out) == ["manifest.json", "model.mnn", "result.json"]


def test_accuracy_budget_missed_fails_and_publishes_nothing(digits_models, tmp_path, cache_dir):
    # Calibrating on images 16x darker than the real ones sets activation ranges far too small.
    dark = {**CALIB, "preprocess": {**GRAY, "scale": 255.0 * 16}}
    out = tmp_path / "out"

    with pytest.raises(StepFailed, match=r"accuracy drop .* pp > max_accuracy_drop 0.5 pp"):
        run_step("quantize", spec(digits_models, out, calibration=dark, max_accuracy_drop=0.5), quiet=True)

    assert published(out) == []


def test_sensitivity_table_lists_every_quantizable_layer(digits_models, tmp_path, cache_dir):
    out = tmp_path / "out"

    result = run_step("quantize", spec(digits_models, out, sensitivity=True), quiet=True)

    rows = result.sensitivity
    assert rows is not None and len(rows) == 4
    assert all(r.op_type == "Convolution" and 0.99 < r.alone.cosine <= 1.0 for r in rows)
    assert [r.error for r in rows] == sorted((r.error for r in rows), reverse=True)
    table = (out / "sensitivity.md").read_text()
    assert all(f"`{r.layer}`" in table for r in rows)
    assert result.float_layers == []


def test_auto_mode_keeps_layers_in_float_until_the_budget_is_met(digits_models, tmp_path, cache_dir):
    # Unlabelled evaluation -> the fidelity budget applies; ask for a little more than full int8 gives.
    from mnnpipe.data import load_dataset
    from mnnpipe.specs import DatasetRef

    test = load_dataset(DatasetRef(**EVAL))
    npz = tmp_path / "eval.npz"
    np.savez(npz, x=test.raw)
    unlabelled = {"format": "npz", "uri": str(npz), "preprocess": GRAY}
    full = run_step("quantize", spec(digits_models, tmp_path / "full", evaluation=unlabelled), quiet=True)
    wanted = full.quantized.cosine + (1 - full.quantized.cosine) * 0.02
    fidelity = {"max_abs_error": None, "min_cosine": wanted, "min_top1_agreement": 0.9}

    result = run_step(
        "quantize", spec(digits_models, tmp_path / "auto", evaluation=unlabelled, mixed_precision="auto", fidelity=fidelity),
        quiet=True,
    )

    assert result.quantized.accuracy is None
    assert result.quantized.cosine >= wanted
    assert 1 <= len(result.float_layers) <= 4
    assert result.op_types.get("Convolution", 0) == len(result.float_layers)
    assert result.attempts >= 2
    assert "| yes |" in (tmp_path / "auto" / "sensitivity.md").read_text()


def test_auto_mode_fails_clearly_when_even_all_float_misses_the_budget(digits_models, tmp_path, cache_dir):
    dark = {**CALIB, "preprocess": {**GRAY, "scale": 255.0 * 16}}
    out = tmp_path / "out"

    # Activations other than conv outputs stay int8 with MNN's skip list, so a collapsed
    # calibration cannot be rescued by keeping convs in float.
    with pytest.raises(StepFailed, match=r"even with all 4 quantizable layers kept in float"):
        run_step("quantize", spec(digits_models, out, calibration=dark, mixed_precision="auto", max_accuracy_drop=0.0), quiet=True)

    assert published(out) == []


def test_weight_only_and_fp16_modes_shrink_the_weights_through_the_converter(digits_models, tmp_path, cache_dir):
    model = {"uri": str(digits_models["pth"]), "factory": "mnnpipe.models:digits_cnn"}
    base = {"model": model, "input": {"name": "input", "shape": [1, 1, 8, 8]}, "evaluation": EVAL}

    w8 = run_step("quantize", {**base, "mode": "weight-only", "output": str(tmp_path / "w8")}, quiet=True)
    half = run_step("quantize", {**base, "mode": "fp16", "output": str(tmp_path / "fp16")}, quiet=True)

    assert 0.2 < w8.size_ratio < 0.4
    assert 0.4 < half.size_ratio < 0.6
    assert any(k.endswith("-weights]") for k in w8.op_types) and "Convolution[int8]" not in w8.op_types
    assert half.op_types.get("Convolution[fp16-weights]", 0) >= 1
    assert w8.quantized.accuracy_drop_pp <= 0.5 and half.quantized.accuracy_drop_pp <= 0.5


def test_calibration_images_of_the_wrong_size_are_rejected(digits_models, tmp_path, cache_dir):
    out = tmp_path / "out"
    wrong = {**CALIB, "preprocess": {**GRAY, "size": [16, 16]}}

    with pytest.raises(InputError, match=r"calibration: samples have shape \[1, 16, 16\] but the model's input"):
        run_step("quantize", spec(digits_models, out, calibration=wrong), quiet=True)

    assert published(out) == []


def test_calibration_with_the_wrong_channel_count_is_rejected(digits_models, tmp_path, cache_dir):
    with pytest.raises(InputError, match=r"\[3, 8, 8\] but the model's input 'input' takes \[1, 8, 8\]"):
        run_step("quantize", spec(digits_models, tmp_path / "out", calibration={**CALIB, "preprocess": {"channels": "RGB"}}), quiet=True)


def test_empty_or_unreadable_calibration_folders_are_input_errors(digits_models, tmp_path, cache_dir):
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    junk = tmp_path / "junk"
    (junk / "a").mkdir(parents=True)
    (junk / "a" / "notes.txt").write_text("not an image")
    broken = tmp_path / "broken"
    (broken / "a").mkdir(parents=True)
    (broken / "a" / "x.png").write_bytes(b"\x89PNG but truncated")

    for folder, message in ((empty, "no images found"), (junk, "not an image"), (broken, "unreadable image")):
        calib = {"format": "image-folder", "uri": str(folder), "preprocess": GRAY}
        with pytest.raises(InputError, match=message):
            run_step("quantize", spec(digits_models, tmp_path / f"out-{folder.name}", calibration=calib), quiet=True)
        assert published(tmp_path / f"out-{folder.name}") == []


def test_unknown_skip_layer_and_admm_are_rejected_with_reasons(digits_models, tmp_path, cache_dir):
    with pytest.raises(InputError, match="not quantizable layers of this model"):
        run_step("quantize", spec(digits_models, tmp_path / "a", skip_layers=["nope"]), quiet=True)
    with pytest.raises(SpecError, match="activation_method: .*ADMM.* crashes MNN 3.6.1"):
        run_step("quantize", spec(digits_models, tmp_path / "b", activation_method="ADMM"), quiet=True)


def test_result_json_round_trips(digits_models, tmp_path, cache_dir):
    out = tmp_path / "out"
    result = run_step("quantize", spec(digits_models, out, activation_method="EMA", max_accuracy_drop=3.0), quiet=True)

    data = json.loads((out / "result.json").read_text())

    assert data["kind"] == "quantize" and data["mode"] == "full-int8"
    assert data["op_types"] == result.op_types
    assert data["metrics"]["size_ratio"] == pytest.approx(result.size_ratio, rel=1e-6)
