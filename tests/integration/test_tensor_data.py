"""Datasets of model inputs that are not images: float N-D tensors and int64 token ids, from npz,
fed as stored (no 'image arrays must be uint8', no float cast of token ids)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mnnpipe.errors import InputError
from mnnpipe.runner import run_step

pytestmark = pytest.mark.integration


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.net(x).flatten(1))


class _Tokens(nn.Module):
    """Token ids [1, 8] int64 -> 4 scores; the ids index an embedding table (a float id breaks it)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.fc = nn.Linear(16 * 8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(ids).flatten(1))


def test_float_nchw_tensors_calibrate_and_evaluate_full_int8(tmp_path, cache_dir):
    from mnnpipe.engines.mnn import convert_onnx_to_mnn
    from mnnpipe.engines.onnx_export import export_onnx

    torch.manual_seed(0)
    export_onnx(_Conv().eval(), (torch.rand(1, 3, 8, 8),), tmp_path / "m.onnx", input_names=["input"], dynamic_batch=False)
    convert_onnx_to_mnn(tmp_path / "m.onnx", tmp_path / "m.mnn")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(32, 3, 8, 8)).astype(np.float32))
    np.savez(tmp_path / "eval.npz", x=rng.normal(size=(16, 3, 8, 8)).astype(np.float32))
    spec = {
        "model": {"uri": str(tmp_path / "m.mnn")},
        "calibration": {"format": "npz", "uri": str(tmp_path / "calib.npz")},
        "evaluation": {"format": "npz", "uri": str(tmp_path / "eval.npz")},
        "fidelity": {"max_abs_error": None, "min_cosine": 0.99, "min_top1_agreement": 0.8},
        "output": str(tmp_path / "out"),
    }

    result = run_step("quantize", spec, quiet=True)

    assert result.op_types.get("Convolution[int8]", 0) >= 2
    assert result.quantized.cosine > 0.99


def test_preprocess_on_tensor_data_is_refused_in_one_line(tmp_path):
    from mnnpipe.data import load_dataset
    from mnnpipe.specs import DatasetRef

    np.savez(tmp_path / "t.npz", x=np.zeros((4, 3, 8, 8), np.float32))
    ref = DatasetRef(format="npz", uri=str(tmp_path / "t.npz"), preprocess={"scale": 1.0})

    with pytest.raises(InputError, match=r"^[^\n]*t\.npz: preprocess applies to uint8 images .* remove preprocess$"):
        load_dataset(ref, tmp_path / "t.npz")


def test_int64_token_ids_stay_integers_and_convert_verifies_on_them(tmp_path, cache_dir):
    from mnnpipe.data import load_dataset
    from mnnpipe.specs import DatasetRef

    torch.manual_seed(0)
    from mnnpipe.engines.onnx_export import export_onnx

    export_onnx(_Tokens().eval(), (torch.randint(0, 100, (1, 8)),), tmp_path / "tok.onnx", input_names=["ids"], dynamic_batch=False)
    ids = np.random.default_rng(0).integers(0, 100, size=(12, 8), dtype=np.int64)
    np.savez(tmp_path / "ids.npz", x=ids)

    data = load_dataset(DatasetRef(format="npz", uri=str(tmp_path / "ids.npz")), tmp_path / "ids.npz")
    assert data.x.dtype == np.int64 and np.array_equal(data.x, ids)  # not /255, not float

    result = run_step(
        "convert",
        {
            "model": {"uri": str(tmp_path / "tok.onnx"), "format": "onnx"},
            "inputs": [{"name": "ids", "shape": [1, 8], "dtype": "int64", "range": [0, 100]}],
            "samples": {"format": "npz", "uri": str(tmp_path / "ids.npz")},
            "output": str(tmp_path / "out"),
        },
        quiet=True,
    )
    assert result.fidelity.samples == 8 and result.fidelity.cosine > 0.9999


def test_weight_only_needs_no_evaluation_set_and_checks_on_random_inputs(tmp_path, cache_dir):
    from mnnpipe.engines.onnx_export import export_onnx

    torch.manual_seed(0)
    export_onnx(_Conv().eval(), (torch.rand(1, 3, 8, 8),), tmp_path / "m.onnx", input_names=["input"], dynamic_batch=False)
    spec = {
        "model": {"uri": str(tmp_path / "m.onnx"), "format": "onnx"},
        "mode": "weight-only",
        "num_samples": 12,
        "fidelity": {"max_abs_error": None, "min_cosine": 0.999},
        "output": str(tmp_path / "out"),
    }

    result = run_step("quantize", spec, quiet=True)

    assert result.quantized.cosine > 0.999 and result.size_ratio < 0.6
    assert (tmp_path / "out" / "model.mnn").exists()


def test_int64_token_model_quantizes_full_int8_from_token_id_npz(tmp_path, cache_dir):
    from mnnpipe.engines.onnx_export import export_onnx

    torch.manual_seed(0)
    export_onnx(_Tokens().eval(), (torch.randint(0, 100, (1, 8)),), tmp_path / "tok.onnx", input_names=["ids"], dynamic_batch=False)
    np.savez(tmp_path / "ids.npz", x=np.random.default_rng(0).integers(0, 100, size=(24, 8), dtype=np.int64))
    ids = {"format": "npz", "uri": str(tmp_path / "ids.npz")}
    spec = {
        "model": {"uri": str(tmp_path / "tok.onnx"), "format": "onnx"},  # input name, shape and int64 read from the graph
        "calibration": {**ids, "split": "train"},
        "evaluation": {**ids, "split": "test"},
        "fidelity": {"max_abs_error": None, "min_cosine": 0.99, "min_top1_agreement": 0.5},
        "output": str(tmp_path / "out"),
    }

    result = run_step("quantize", spec, quiet=True)

    assert result.op_types.get("Convolution[int8]", 0) == 1 and result.quantized.cosine > 0.99
