"""mnnpipe.engines.mnn_file (the .mnn flatbuffer reader) against MNN's own JSON dump of the same
files: the labels op_types shows must not change with the reader."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("_tools")

from mnnpipe.engines import mnn as E  # noqa: E402
from mnnpipe.engines import mnn_file  # noqa: E402
from mnnpipe.errors import InputError  # noqa: E402

_CONV_TYPES = {"Convolution", "ConvolutionDepthwise", "Deconvolution", "DeconvolutionDepthwise"}


def _json_label(op: dict) -> str:
    """The labelling mnnpipe used before the flatbuffer reader, on MNN's JSON dump of an op."""
    kind = op.get("type", "?")
    main = op.get("main") or {}
    quant = main.get("quanParameter") if isinstance(main, dict) else None
    if kind not in _CONV_TYPES or not quant:
        return kind
    if main.get("symmetricQuan") or quant.get("scaleIn"):
        return f"{kind}[int8]"
    if quant.get("type") == 3:
        return f"{kind}[fp16-weights]"
    return f"{kind}[int{quant.get('aMaxOrBits', 8)}-weights]"


def _json_dump(path: Path, tmp: Path) -> dict:
    dump = tmp / f"{path.stem}.json"
    E._run_tool("mnnconvert", ["-f", "MNN", "--modelFile", str(path.absolute()), "--JsonFile", str(dump.absolute())], output=dump, timeout_s=120)
    return json.loads(dump.read_text())


class _Net(torch.nn.Module):
    """Conv, depthwise conv, transposed conv, pooling and a linear layer: every conv kind."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.f = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
            nn.ConvTranspose2d(16, 8, 2, stride=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
        )  # fmt: skip

    def forward(self, x):
        return self.f(x)


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[str, Path]:
    """fp32, full-int8 (KL), weight-only int8 / int4 and fp16-weight .mnn files of one model."""
    from PIL import Image

    d = tmp_path_factory.mktemp("mnnfile")
    torch.manual_seed(0)
    onnx_path = d / "net.onnx"
    torch.onnx.export(_Net().eval(), torch.randn(1, 3, 16, 16), str(onnx_path), dynamo=False, opset_version=13, input_names=["image"])
    out = {name: d / f"{name}.mnn" for name in ("fp32", "int8", "w8", "w4", "fp16")}
    E.convert_onnx_to_mnn(onnx_path, out["fp32"])
    E.convert_onnx_to_mnn(onnx_path, out["w8"], weight_quant_bits=8)
    E.convert_onnx_to_mnn(onnx_path, out["w4"], weight_quant_bits=4)
    E.convert_onnx_to_mnn(onnx_path, out["fp16"], fp16=True)
    calib = d / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "RGB").save(calib / f"{i}.png")
    config = {"format": "RGB", "mean": [127.5] * 3, "normal": [1 / 127.5] * 3, "width": 16, "height": 16,
              "path": str(calib), "used_image_num": 3, "feature_quantize_method": "KL", "weight_quantize_method": "MAX_ABS"}  # fmt: skip
    E.quantize_int8(out["fp32"], out["int8"], config)
    return out


def test_labels_match_mnn_json_dump(variants, tmp_path: Path) -> None:
    for name, path in variants.items():
        net = _json_dump(path, tmp_path)
        expected = [(op.get("name", ""), _json_label(op)) for op in net["oplists"]]
        got = [(op.name, op.label) for op in mnn_file.read_ops(path)]
        assert got == expected, name
        assert E.op_types(path) == dict(collections.Counter(label for _, label in expected)), name
    int8 = E.op_types(variants["int8"])
    assert int8.get("Convolution[int8]", 0) >= 2 and "Convolution" not in int8, int8
    assert E.op_types(variants["w4"]).get("Convolution[int4-weights]", 0) >= 1
    assert E.op_types(variants["fp16"]).get("Convolution[fp16-weights]", 0) >= 1
    assert "Convolution" in E.op_types(variants["fp32"])


def test_inputs(variants) -> None:
    assert mnn_file.read_inputs(variants["fp32"]) == {"image": [1, 3, 16, 16]}


def test_bytes_that_are_not_a_model(tmp_path: Path) -> None:
    for i, data in enumerate([b"", b"\x00garbage" * 16, b"\xff" * 64, np.random.default_rng(0).bytes(4096)]):
        junk = tmp_path / f"junk{i}.mnn"
        junk.write_bytes(data)
        with pytest.raises(InputError, match=f"junk{i}.mnn"):
            E.op_types(junk)
