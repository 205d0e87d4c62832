"""Quantization-aware fine-tuning (mnnpipe.qat) recovers the int8 accuracy that MNN's post-training
quantizer loses, on a digits model built to lose it, and MNN honours the scales it writes."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from mnnpipe.runner import run_step

pytestmark = pytest.mark.integration

GRAY = {"channels": "GRAY"}
OUTLIER_GAIN = 300.0


class _MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 64)
        self.fc2 = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _digits(split: str):
    from mnnpipe.data import load_dataset
    from mnnpipe.specs import DatasetRef

    return load_dataset(DatasetRef(format="sklearn-digits", split=split, preprocess=GRAY))


def _to_mnn(model: torch.nn.Module, root: Path, name: str, params: Path | None = None) -> Path:
    from mnnpipe.engines.mnn import convert_onnx_to_mnn
    from mnnpipe.engines.onnx_export import export_onnx

    export_onnx(model, (torch.rand(1, 1, 8, 8),), root / f"{name}.onnx", input_names=["input"], dynamic_batch=False)
    convert_onnx_to_mnn(root / f"{name}.onnx", root / f"{name}.mnn", compression_params=params)
    return root / f"{name}.mnn"


def _accuracy(path: Path, data) -> float:
    from mnnpipe.engines.mnn import load_session

    session = load_session(path)
    out = np.concatenate([session.run([data.x[i : i + 1]])[0].reshape(1, -1) for i in range(len(data))])
    return float((out.argmax(1) == data.y).mean())


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory) -> dict:
    """A trained digits MLP with one hidden unit scaled up 300x and its outgoing weights down 300x:
    the same fp32 function, but that unit sets the hidden layer's per-tensor int8 scale."""
    from mnnpipe.train import FitConfig, fit

    root = tmp_path_factory.mktemp("qat")
    torch.manual_seed(0)
    model = _MLP()
    train = _digits("train")
    fit(model, train, FitConfig(epochs=8, lr=3e-3, seed=0))
    model.eval()
    with torch.no_grad():
        unit = int(torch.relu(model.fc1(torch.from_numpy(train.x).flatten(1))).mean(0).argmax())
        model.fc1.weight[unit] *= OUTLIER_GAIN
        model.fc1.bias[unit] *= OUTLIER_GAIN
        model.fc2.weight[:, unit] /= OUTLIER_GAIN
    return {"model": model, "root": root, "mnn": _to_mnn(model, root, "fp32"), "train": train, "test": _digits("test")}


def test_qat_recovers_the_accuracy_post_training_int8_loses(outlier_model, tmp_path):
    from mnnpipe.engines.mnn import op_types
    from mnnpipe.qat import QatModel, write_compression_params

    ptq = run_step(
        "quantize",
        {
            "model": {"uri": str(outlier_model["mnn"])},
            "calibration": {"format": "sklearn-digits", "split": "train", "limit": 100, "preprocess": GRAY},
            "evaluation": {"format": "sklearn-digits", "split": "test", "preprocess": GRAY},
            "max_accuracy_drop": 100,
            "output": str(tmp_path / "ptq"),
        },
        quiet=True,
    )
    assert ptq.quantized.accuracy_drop_pp > 1.0  # the model this test needs: PTQ loses accuracy

    qat = QatModel(copy.deepcopy(outlier_model["model"]))
    train, test = outlier_model["train"], outlier_model["test"]
    qat.fine_tune(train.x, train.y, epochs=20, lr=1e-3)
    with torch.no_grad():
        fake_quant_accuracy = float((qat.model(torch.from_numpy(test.x)).argmax(1).numpy() == test.y).mean())
    scales = qat.strip()
    params = tmp_path / "qat.params"
    (tmp_path / "onnx").mkdir()
    from mnnpipe.engines.onnx_export import export_onnx

    export_onnx(qat.model, (torch.rand(1, 1, 8, 8),), tmp_path / "onnx" / "qat.onnx", input_names=["input"], dynamic_batch=False)
    assert write_compression_params(tmp_path / "onnx" / "qat.onnx", scales, params) == []
    mnn = _to_mnn(qat.model, tmp_path, "qat", params)

    accuracy = _accuracy(mnn, test)
    assert op_types(mnn).get("Convolution[int8]", 0) >= 1
    # MNN runs the scales the fine-tune learned with: its int8 accuracy is the fake-quant one
    assert abs(accuracy - fake_quant_accuracy) < 0.03, (accuracy, fake_quant_accuracy)
    assert accuracy > ptq.quantized.accuracy + 0.3, (accuracy, ptq.quantized.accuracy)


FACTORY_MODULE = '''
import torch


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 64)
        self.fc2 = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def mlp():
    return MLP()
'''


def test_quantize_mode_qat_through_the_cli_beats_full_int8(outlier_model, tmp_path):
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "qat_factories.py").write_text(FACTORY_MODULE)
    torch.save(outlier_model["model"].state_dict(), tmp_path / "outlier.pth")
    common = {
        "model": {"uri": str(tmp_path / "outlier.pth"), "factory": "qat_factories:mlp"},
        "input": {"name": "input", "shape": [1, 1, 8, 8]},
        "calibration": {"format": "sklearn-digits", "split": "train", "preprocess": GRAY},
        "evaluation": {"format": "sklearn-digits", "split": "test", "preprocess": GRAY},
        "max_accuracy_drop": 25,
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}

    def run(mode: str) -> subprocess.CompletedProcess:
        spec = tmp_path / f"{mode}.json"
        extra = {"qat_epochs": 20} if mode == "qat" else {}
        spec.write_text(json.dumps({**common, **extra, "mode": mode, "output": str(tmp_path / mode)}))
        cmd = [sys.executable, "-m", "mnnpipe.cli", "--quiet", "run", "quantize", "--spec", str(spec), "--no-cache"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)

    ptq, qat = run("full-int8"), run("qat")

    assert ptq.returncode == 1 and "accuracy drop" in ptq.stderr, ptq.stderr  # 76 pp > the 25 pp budget
    assert qat.returncode == 0, qat.stderr
    result = json.loads(qat.stdout)
    assert result["mode"] == "qat" and result["quantized"]["accuracy_drop_pp"] <= 25
    assert result["op_types"].get("Convolution[int8]", 0) >= 1
    assert (tmp_path / "qat" / "model.mnn").is_file()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": {"uri": "m.mnn"}}, "mode 'qat' fine-tunes the torch model: give a state-dict"),
        ({"calibration": None}, "calibration is required for mode 'qat'"),
        ({"skip_layers": ["fc1"]}, "skip_layers applies to mode full-int8 only, not qat"),
    ],
)
def test_qat_spec_refuses_what_it_cannot_fine_tune(change, message):
    from mnnpipe.errors import SpecError
    from mnnpipe.runner import parse_spec

    spec = {
        "mode": "qat",
        "model": {"uri": "m.pth", "factory": "pkg.mod:fn"},
        "input": {"name": "input", "shape": [1, 1, 8, 8]},
        "calibration": {"format": "sklearn-digits"},
        "evaluation": {"format": "sklearn-digits"},
        "output": "out",
        **change,
    }
    with pytest.raises(SpecError) as exc:
        parse_spec("quantize", {k: v for k, v in spec.items() if v is not None})
    assert message in str(exc.value)
