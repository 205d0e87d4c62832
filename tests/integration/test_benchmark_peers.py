"""The benchmark step's peer runtimes: ONNX Runtime int8 with unsigned activations and OpenVINO
fp32/int8, built from the convert step's model.onnx and reported with their settings."""

from __future__ import annotations

import json

import pytest
import torch

from mnnpipe.modelio import save_torchscript
from mnnpipe.models import digits_cnn
from mnnpipe.runner import run_step

pytestmark = pytest.mark.integration

DIGITS = {"format": "sklearn-digits", "preprocess": {"channels": "GRAY"}}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("peers")
    torch.manual_seed(0)
    save_torchscript(digits_cnn().eval(), (torch.rand(1, 1, 8, 8),), root / "digits.pt")
    conv = run_step("convert", {"model": {"uri": str(root / "digits.pt")}, "inputs": [{"shape": [1, 1, 8, 8]}], "output": str(root / "conv")})
    return {"onnx": conv.artifacts["model.onnx"].uri, "mnn": conv.artifacts["model.mnn"].uri}


def _spec(converted, peers, out) -> dict:
    return {
        "models": [{"label": "onnx", "model": {"uri": converted["onnx"]}}, {"label": "mnn", "model": {"uri": converted["mnn"]}}],
        "dataset": {**DIGITS, "split": "test", "limit": 40},
        "peers": peers,
        "peer_calibration": {**DIGITS, "split": "train", "limit": 16},
        "warmup": 1,
        "iterations": 3,
        "reference": "onnx",
        "output": str(out),
    }


def _quantize_linear_zero_point_types(path) -> set[int]:
    import onnx

    model = onnx.load(path)
    inits = {i.name: i.data_type for i in model.graph.initializer}
    return {inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}


def test_onnxruntime_peer_uses_unsigned_activations_and_states_its_setting(converted, tmp_path, cache_dir):
    result = run_step("benchmark", _spec(converted, ["onnxruntime-int8-u8s8"], tmp_path / "out"))

    by = {s.label: s for s in result.models}
    peer = by["onnxruntime-int8-u8s8"]
    assert peer.format == "onnx" and "QUInt8" in peer.setting and "train split" in peer.setting
    assert peer.fidelity is not None and peer.fidelity.cosine > 0.99
    assert {r.label for r in result.rows} == {"onnx", "mnn", "onnxruntime-int8-u8s8"}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Peer onnxruntime-int8-u8s8: ONNX Runtime static int8: QDQ, activations QUInt8" in report
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert any(m["label"] == "onnxruntime-int8-u8s8" and m["setting"] for m in metrics["models"])


def test_unsigned_activations_in_the_built_peer(converted, tmp_path):
    import numpy as np
    from onnx import TensorProto

    from pathlib import Path

    from mnnpipe.engines.peers import build_peer

    samples = [np.random.default_rng(i).uniform(0, 16, (1, 1, 8, 8)).astype(np.float32) for i in range(4)]
    path = build_peer("onnxruntime-int8-u8s8", Path(converted["onnx"]), samples, "input", tmp_path)
    assert _quantize_linear_zero_point_types(str(path)) == {TensorProto.UINT8}


def test_openvino_peers(converted, tmp_path, cache_dir):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")

    result = run_step("benchmark", _spec(converted, ["openvino-fp32", "openvino-int8"], tmp_path / "out"))

    by = {s.label: s for s in result.models}
    assert by["openvino-fp32"].format == "openvino" and by["openvino-fp32"].fidelity.cosine > 0.9999
    assert by["openvino-int8"].fidelity.cosine > 0.99 and "NNCF" in by["openvino-int8"].setting
    assert by["openvino-fp32"].size_bytes > 4 * 1000  # the IR's .bin counts, not only the .xml
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Peer openvino-int8: OpenVINO CPU plugin, int8" in report


def test_peers_need_an_onnx_model(converted, tmp_path):
    from mnnpipe.errors import SpecError

    spec = _spec(converted, ["onnxruntime-int8-u8s8"], tmp_path / "out")
    spec["models"] = spec["models"][1:]
    spec["reference"] = None
    with pytest.raises(SpecError, match="peers: need an fp32 ONNX model"):
        run_step("benchmark", spec)


@pytest.mark.skipif(not __import__("os").environ.get("MNNPIPE_MNN_BENCHMARK"), reason="opt-in: set MNNPIPE_MNN_BENCHMARK to a benchmark.out built by scripts/build-mnn.sh")
def test_source_built_mnn_runtime_times_every_mnn_model(converted, tmp_path, cache_dir):
    spec = _spec(converted, [], tmp_path / "out")
    spec["threads"] = [1, 2]

    result = run_step("benchmark", spec)

    assert [(r.label, r.threads) for r in result.mnn_source_built] == [("mnn", 1), ("mnn", 2)]
    assert all(0 < r.min_ms <= r.avg_ms <= r.max_ms for r in result.mnn_source_built)
    assert "## MNN built from source" in (tmp_path / "out" / "report.md").read_text()
