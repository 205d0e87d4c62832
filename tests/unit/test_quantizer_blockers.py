"""Op types known to crash MNN 3.6.1's quantizer are refused before it runs, naming the op and
what to do; the same models quantize when the advice is followed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("_tools")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from mnnpipe.engines import mnn as E  # noqa: E402
from mnnpipe.errors import InputError  # noqa: E402

nn = torch.nn


class _TorchLRN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.LocalResponseNorm(3), nn.Conv2d(8, 8, 3, padding=1))

    def forward(self, x):
        return self.f(x)


class _Mean(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.c(x)).mean((2, 3)))


def _onnx_lrn(path: Path) -> None:
    """Conv -> ONNX LRN -> Conv (what inception_v1/alexnet of the onnx model zoo contain)."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("Conv", ["image", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("LRN", ["c1"], ["lrn1"], size=3, alpha=1e-4, beta=0.75, bias=1.0),
        helper.make_node("Conv", ["lrn1", "w2"], ["out"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8, 16, 16])], initializer=[w1, w2],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from PIL import Image

    d = tmp_path_factory.mktemp("blockers")
    torch.manual_seed(0)
    out = {}
    for name, module in (("torch_lrn", _TorchLRN()), ("mean", _Mean())):
        onnx_path = d / f"{name}.onnx"
        torch.onnx.export(module.eval(), torch.randn(1, 3, 16, 16), str(onnx_path), dynamo=False, opset_version=13, input_names=["image"])
        out[name] = onnx_path
    gru = nn.GRU(16, 16, num_layers=2, batch_first=True).eval()
    torch.onnx.export(gru, torch.randn(1, 20, 16), str(d / "gru.onnx"), dynamo=False, opset_version=13, input_names=["image"])
    out["gru"] = d / "gru.onnx"
    _onnx_lrn(d / "onnx_lrn.onnx")
    out["onnx_lrn"] = d / "onnx_lrn.onnx"
    for name, onnx_path in list(out.items()):
        out[name] = d / f"{name}.mnn"
        E.convert_onnx_to_mnn(onnx_path, out[name])
    calib = d / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "RGB").save(calib / f"{i}.png")
    out["calib"] = calib
    return out


def _config(models, method: str) -> dict:
    return {"format": "RGB", "mean": [127.5] * 3, "normal": [1 / 127.5] * 3, "width": 16, "height": 16,
            "path": str(models["calib"]), "used_image_num": 3, "feature_quantize_method": method,
            "weight_quantize_method": "MAX_ABS", "batch_size": 1}  # fmt: skip


@pytest.mark.parametrize(
    "name,method,names",
    [("onnx_lrn", "KL", ("LRN", "'lrn1'", "EMA")), ("mean", "KL", ("ReduceMean", "EMA")), ("torch_lrn", "KL", ("If", "LocalResponseNorm")),
     ("torch_lrn", "EMA", ("If", "LocalResponseNorm")), ("gru", "KL", ("While", "GRU", "weight-only")),
     ("gru", "EMA", ("While", "GRU", "weight-only"))],
)  # fmt: skip
def test_refused_before_the_quantizer_runs(models, tmp_path: Path, name: str, method: str, names: tuple[str, ...]) -> None:
    dst = tmp_path / "q.mnn"
    with pytest.raises(InputError) as exc:
        E.quantize_int8(models[name], dst, _config(models, method))
    msg = str(exc.value)
    assert "\n" not in msg and f"{name}.mnn" in msg and method in msg, msg
    for word in names:
        assert word in msg, msg
    assert not dst.exists()


@pytest.mark.parametrize("name", ["onnx_lrn", "mean"])
def test_ema_advice_works(models, tmp_path: Path, name: str) -> None:
    dst = tmp_path / "q.mnn"
    E.quantize_int8(models[name], dst, _config(models, "EMA"))
    assert E.op_types(dst).get("Convolution[int8]", 0) >= 2
