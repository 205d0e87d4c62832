"""mnnpipe.engines.mnn against the real MNN 3.6.1 wheel, on tiny models built here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("_tools")

from mnnpipe.engines import mnn as E  # noqa: E402
from mnnpipe.errors import InputError, ToolError  # noqa: E402


class _Net(torch.nn.Module):
    """Conv-BN-ReLU x3 (64 channels, enough weights that headers do not dominate file sizes)."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.f = nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
        )  # fmt: skip

    def forward(self, x):
        return self.f(x)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """A torch model, its ONNX export and the fp32 .mnn, made once for the module."""
    d = tmp_path_factory.mktemp("mnn")
    torch.manual_seed(0)
    m = _Net().eval()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    onnx_path = d / "net.onnx"
    torch.onnx.export(
        m, torch.randn(1, 3, 32, 32), str(onnx_path), dynamo=False, opset_version=13,
        input_names=["image"], output_names=["logits"],
    )  # fmt: skip
    mnn_path = d / "net.mnn"
    log = E.convert_onnx_to_mnn(onnx_path, mnn_path)
    return {"dir": d, "torch": m, "onnx": onnx_path, "mnn": mnn_path, "log": log}


def test_convert_and_run_matches_torch(models) -> None:
    assert "Converted Success" in models["log"]
    sess = E.load_session(models["mnn"], threads=1)
    assert sess.input_names == ["image"] and sess.output_names == ["logits"]
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = models["torch"](torch.from_numpy(x)).numpy()
    (out_dict,) = sess.run({"image": x})
    (out_list,) = sess.run([x])
    assert out_dict.shape == (1, 10)
    assert np.abs(out_dict - ref).max() < 1e-4
    np.testing.assert_array_equal(out_dict, out_list)


def test_fp16_and_weight_quant_sizes(models) -> None:
    d, fp32 = models["dir"], models["mnn"].stat().st_size
    E.convert_onnx_to_mnn(models["onnx"], d / "fp16.mnn", fp16=True)
    E.convert_onnx_to_mnn(models["onnx"], d / "w8.mnn", weight_quant_bits=8)
    assert 0.45 < (d / "fp16.mnn").stat().st_size / fp32 < 0.6
    assert 0.2 < (d / "w8.mnn").stat().st_size / fp32 < 0.35
    ops = E.op_types(d / "w8.mnn")
    assert ops.get("Convolution[int8-weights]", 0) >= 3 and "Convolution[int8]" not in ops
    with pytest.raises(ValueError):
        E.convert_onnx_to_mnn(models["onnx"], d / "x.mnn", fp16=True, weight_quant_bits=8)


def test_sparse_weights_shrink_only_with_detect_sparse(models, tmp_path: Path) -> None:
    sparse = _Net().eval()
    sparse.load_state_dict(models["torch"].state_dict())
    with torch.no_grad():
        for mod in sparse.modules():
            if isinstance(mod, torch.nn.Conv2d):
                w = mod.weight
                w.mul_(w.abs() > w.abs().flatten().quantile(0.9))  # 90% zeros
    onnx_path = tmp_path / "sparse.onnx"
    torch.onnx.export(sparse, torch.randn(1, 3, 32, 32), str(onnx_path), dynamo=False, opset_version=13, input_names=["image"])
    E.convert_onnx_to_mnn(onnx_path, tmp_path / "dense-storage.mnn")
    E.convert_onnx_to_mnn(onnx_path, tmp_path / "sparse-storage.mnn", detect_sparse=True)
    dense, compact = ((tmp_path / f).stat().st_size for f in ("dense-storage.mnn", "sparse-storage.mnn"))
    assert compact < 0.5 * dense
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    (a,) = E.load_session(tmp_path / "dense-storage.mnn").run([x])
    (b,) = E.load_session(tmp_path / "sparse-storage.mnn").run([x])
    assert np.abs(a - b).max() < 1e-4


def test_full_int8_quantization(models, tmp_path: Path) -> None:
    from PIL import Image

    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "RGB").save(calib / f"{i}.png")
    config = {
        "format": "RGB", "mean": [127.5] * 3, "normal": [1 / 127.5] * 3, "width": 32, "height": 32,
        "path": str(calib), "used_image_num": 4,
        "feature_quantize_method": "KL", "weight_quantize_method": "MAX_ABS", "debug": True,
    }  # fmt: skip
    dst = tmp_path / "int8.mnn"
    log = E.quantize_int8(models["mnn"], dst, config)
    assert dst.stat().st_size < 0.35 * models["mnn"].stat().st_size
    ops = E.op_types(dst)
    assert ops.get("Convolution[int8]", 0) >= 3, ops
    rows = E.parse_debug_distances(log)
    assert rows and all(-1.0 <= r["cosine"] <= 1.0 for r in rows)
    x = (rng.integers(0, 256, (1, 3, 32, 32)).astype(np.float32) - 127.5) / 127.5
    (ref,) = E.load_session(models["mnn"]).run([x])
    (q,) = E.load_session(dst).run([x])
    cos = float((ref * q).sum() / (np.linalg.norm(ref) * np.linalg.norm(q)))
    assert cos > 0.99


def test_corrupt_onnx_is_input_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(InputError) as exc:
        E.convert_onnx_to_mnn(bad, tmp_path / "bad.mnn")
    msg = str(exc.value)
    assert "\n" not in msg and "bad.onnx" in msg and "mnnconvert" in msg
    assert not (tmp_path / "bad.mnn").exists()


def test_quantizer_crash_is_tool_error(models, tmp_path: Path) -> None:
    # ADMM feature calibration crashes inside MNN 3.6.1; the crash must become a ToolError.
    calib = tmp_path / "calib"
    calib.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8), "RGB").save(calib / "0.png")
    config = {"format": "RGB", "width": 32, "height": 32, "path": str(calib), "feature_quantize_method": "ADMM"}
    with pytest.raises(ToolError) as exc:
        E.quantize_int8(models["mnn"], tmp_path / "q.mnn", config)
    assert str(exc.value).startswith("mnnquant ") and "\n" not in str(exc.value)


def test_missing_and_unloadable_files_are_input_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.onnx"
    with pytest.raises(InputError, match="nope.onnx"):
        E.convert_onnx_to_mnn(missing, tmp_path / "out.mnn")
    with pytest.raises(InputError, match="nope.mnn"):
        E.quantize_int8(tmp_path / "nope.mnn", tmp_path / "q.mnn", {})
    with pytest.raises(InputError, match="nope.mnn"):
        E.load_session(tmp_path / "nope.mnn")
    junk = tmp_path / "junk.mnn"
    junk.write_bytes(b"\x00garbage" * 16)
    with pytest.raises(InputError, match="junk.mnn"):
        E.load_session(junk)
    with pytest.raises(InputError, match="junk.mnn"):
        E.op_types(junk)


def test_parse_debug_distances() -> None:
    log = (
        "computeDistance: 100.00 %\nDebug info:\n"
        "/f/f.0/Conv_output_0 output_tensor_0:  cos distance: 0.999711, overflow ratio: 0.000001\n"
        "[09:35:56] @ 1763: Quantize model done!"
    )
    assert E.parse_debug_distances(log) == [
        {"op": "/f/f.0/Conv_output_0", "tensor": "output_tensor_0", "cosine": 0.999711, "overflow": 0.000001}
    ]
