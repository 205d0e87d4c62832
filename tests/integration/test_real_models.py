"""Models from the wild: transformer encoders, old ONNX opsets, float64 and long 1-D inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mnnpipe.engines.mnn import load_session
from mnnpipe.models import text_encoder

pytestmark = pytest.mark.integration

TOKENS = 16
ENCODER_INPUTS = [
    {"name": "input_ids", "shape": [1, TOKENS], "dtype": "int64", "range": [0, 100]},
    {"name": "attention_mask", "shape": [1, TOKENS], "dtype": "int64", "range": [1, 2]},
]


def cli(step: str, spec: dict, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    path = tmp_path / f"{step}-spec.json"
    path.write_text(json.dumps(spec))
    return subprocess.run(
        [sys.executable, "-m", "mnnpipe.cli", "--quiet", "run", step, "--spec", str(path), "--no-cache", *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A 2-layer transformer encoder (nn.TransformerEncoder, so MultiheadAttention's fast path
    applies in eval mode) saved as a state-dict."""
    root = tmp_path_factory.mktemp("encoder")
    torch.manual_seed(0)
    model = text_encoder().eval()
    torch.save(model.state_dict(), root / "encoder.pth")
    return {"model": model, "ref": {"uri": str(root / "encoder.pth"), "factory": "mnnpipe.models:text_encoder"}}


def test_transformer_encoder_converts_through_the_cli_and_embeds_like_torch(encoder, tmp_path, cache_dir):
    out = tmp_path / "out"

    proc = cli("convert", {"model": encoder["ref"], "inputs": ENCODER_INPUTS, "output": str(out)}, tmp_path)

    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["fidelity"]["cosine"] > 0.9999
    assert result["export"] == {"opset": 17, "dynamic_batch": True}
    # fresh sentences of different lengths (padding masked out), through the published .mnn
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 100, (4, TOKENS)).astype(np.int64)
    mask = np.ones((4, TOKENS), np.int64)
    for row, length in enumerate((16, 12, 7, 3)):
        mask[row, length:] = 0
    session = load_session(out / "model.mnn")
    got = np.concatenate([session.run({"input_ids": ids[i : i + 1], "attention_mask": mask[i : i + 1]})[0] for i in range(4)])
    with torch.no_grad():
        want = encoder["model"](torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    assert cosine(got, want) > 0.9999
    assert all(cosine(got[i], want[i]) > 0.999 for i in range(4))


# --------------------------------------------------------------------------- ONNX files from the wild


def _save(graph, path: Path, opset: int, ir_version: int) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def opset6_model(path: Path) -> Path:
    """BatchNormalization(6), PRelu(6), AveragePool(1), Gemm(6), Add/Mul(6) with `broadcast`: the
    operators ONNX Runtime no longer runs (IR 3: initializers are graph inputs too)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    arrays = {
        "scale": rng.uniform(0.5, 1.5, 3), "bias": rng.normal(0, 0.1, 3), "mean": rng.normal(0, 0.1, 3),
        "var": rng.uniform(0.5, 1.5, 3), "slope": np.full((3, 1, 1), 0.25), "W": rng.normal(0, 0.3, (48, 10)),
        "B": rng.normal(0, 0.1, 10), "shift": rng.normal(0, 0.1, (1, 10)),
    }
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()]
    inits.append(numpy_helper.from_array(np.array([1, 48], np.int64), "shape"))
    nodes = [
        helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["bn"], epsilon=1e-5, is_test=1),
        helper.make_node("PRelu", ["bn", "slope"], ["pr"]),
        helper.make_node("AveragePool", ["pr"], ["ap"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["ap", "shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "W", "B"], ["g"], broadcast=1),
        helper.make_node("Add", ["g", "shift"], ["a"], broadcast=1),
        helper.make_node("Mul", ["a", "a"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])]
    inputs += [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in inits]
    graph = helper.make_graph(nodes, "opset6", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    return _save(graph, path, opset=6, ir_version=3)


def float64_model(path: Path) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 1, (4, 3)), "W"), numpy_helper.from_array(np.array([0.5, -1.0, 2.0]), "b")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    graph = helper.make_graph(
        nodes, "f64", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [1, 3])], inits,
    )
    return _save(graph, path, opset=13, ir_version=8)


def long_audio_model(path: Path, n: int) -> Path:
    """A 1-D waveform of `n` samples -> strided Conv1d filter bank -> mean over time."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.1, (8, 1, 400)).astype(np.float32), "k"), numpy_helper.from_array(np.array([1, 1, n], np.int64), "shape")]
    nodes = [
        helper.make_node("Reshape", ["audio", "shape"], ["r"]),
        helper.make_node("Conv", ["r", "k"], ["c"], strides=[160]),
        helper.make_node("ReduceMean", ["c"], ["y"], axes=[2], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "audio", [helper.make_tensor_value_info("audio", TensorProto.FLOAT, [n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], inits,
    )
    return _save(graph, path, opset=13, ir_version=8)


def test_opset6_onnx_model_is_verified_on_the_upgraded_graph_and_converts(tmp_path, cache_dir):
    from mnnpipe.runner import run_step

    src = opset6_model(tmp_path / "old.onnx")

    result = run_step("convert", {"model": {"uri": str(src)}, "inputs": [{"name": "x", "shape": [1, 3, 8, 8]}], "output": str(tmp_path / "out")})

    assert result.reference_runtime == "onnxruntime on the model upgraded from opset 6 to 13"
    assert result.opset == 6  # MNN converted the file as it came
    assert result.fidelity.max_abs_error < 1e-4 and result.fidelity.cosine > 0.99999


def test_float64_and_long_1d_inputs_convert_through_the_cli(tmp_path, cache_dir):
    n = 220_000
    f64 = cli(
        "convert",
        {"model": {"uri": str(float64_model(tmp_path / "f64.onnx"))}, "inputs": [{"name": "x", "shape": [1, 4], "dtype": "float64"}], "output": str(tmp_path / "o64")},
        tmp_path,
    )
    audio = cli(
        "convert",
        {"model": {"uri": str(long_audio_model(tmp_path / "audio.onnx", n))}, "inputs": [{"name": "audio", "shape": [n], "range": [-1, 1]}], "num_samples": 2, "output": str(tmp_path / "oa")},
        tmp_path,
    )

    assert f64.returncode == 0, f64.stderr
    assert json.loads(f64.stdout)["fidelity"]["max_abs_error"] < 1e-5  # MNN computes in float32
    assert audio.returncode == 0, audio.stderr
    assert json.loads(audio.stdout)["fidelity"]["cosine"] > 0.99999


# --------------------------------------------------------------------------- when MNN gets it wrong


def batchnorm_model(path: Path, epsilon: float | None) -> Path:
    """Conv -> BatchNormalization (tiny running variances) -> Relu -> Conv. Without an `epsilon`
    attribute ONNX means 1e-5; MNN 3.6.1 then uses none and the outputs blow up."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    arrays = {
        "w1": rng.normal(0, 0.5, (4, 2, 3, 3)), "s": np.ones(4), "b": np.zeros(4), "m": rng.normal(0, 1e-3, 4),
        "v": np.array([1e-7, 1e-6, 1e-4, 1.0]), "w2": rng.normal(0, 0.5, (3, 4, 1, 1)),
    }
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()]
    attrs = {} if epsilon is None else {"epsilon": epsilon}
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"], name="bn1", **attrs),
        helper.make_node("Relu", ["bn"], ["r"], name="relu1"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes, "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 6, 6])], inits,
    )
    return _save(graph, path, opset=13, ir_version=8)


def test_divergence_report_names_the_planted_batchnorm(tmp_path):
    from mnnpipe.divergence import find_divergence
    from mnnpipe.engines.mnn import convert_onnx_to_mnn

    src = batchnorm_model(tmp_path / "bn.onnx", epsilon=None)
    convert_onnx_to_mnn(src, tmp_path / "bn.mnn")  # as MNN reads it, without mnnpipe's rewrite
    x = np.random.default_rng(1).random((1, 2, 6, 6), dtype=np.float32)

    report = find_divergence(src, tmp_path / "bn.mnn", ["x"], [x], tmp_path)

    # MNN fuses conv1 + bn1 + relu1 into one op: the first tensor both models have is relu1's
    assert report.first is not None and ("bn1", "BatchNormalization") in report.first.ops
    assert report.first.ops[-1] == ("relu1", "Relu")
    summary = report.summary()
    assert "fused in MNN with 'conv1' (Conv), 'bn1' (BatchNormalization)" in summary and "write epsilon explicitly" in summary
    assert "| `r` | `conv1` + `bn1` + `relu1` | Conv + BatchNormalization + Relu |" in report.to_markdown()


def test_batchnorm_without_epsilon_is_written_explicitly_and_converts_exactly(tmp_path, cache_dir):
    from mnnpipe.runner import run_step

    src = batchnorm_model(tmp_path / "bn.onnx", epsilon=None)

    result = run_step("convert", {"model": {"uri": str(src)}, "inputs": [{"name": "x", "shape": [1, 2, 6, 6]}], "output": str(tmp_path / "out")})

    assert result.graph_rewrites == ["batchnorm-epsilon"]
    assert result.fidelity.max_abs_error < 1e-3 and result.fidelity.cosine > 0.99999


def old_softmax_model(path: Path) -> Path:
    """Conv -> GlobalAveragePool -> Softmax at opset 9 over [1, 1000, 1, 1], SqueezeNet's classifier."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.5, (1000, 3, 1, 1)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("GlobalAveragePool", ["c"], ["g"]),
        helper.make_node("Softmax", ["g"], ["y"], name="prob"),  # axis 1 by default before opset 13
    ]
    graph = helper.make_graph(
        nodes, "sm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1000, 1, 1])], [w],
    )
    return _save(graph, path, opset=9, ir_version=4)


def test_pre_opset13_softmax_is_flattened_and_converts_exactly(tmp_path, cache_dir):
    from mnnpipe.runner import run_step

    result = run_step(
        "convert", {"model": {"uri": str(old_softmax_model(tmp_path / "sm.onnx"))}, "inputs": [{"name": "x", "shape": [1, 3, 4, 4]}], "output": str(tmp_path / "out")}
    )

    assert result.graph_rewrites == ["softmax-pre13-flatten"]
    assert result.fidelity.max_abs_error < 1e-5 and result.fidelity.cosine > 0.99999


def test_wrong_conversion_fails_naming_the_op_and_keep_failed_keeps_it_outside_the_output(tmp_path, cache_dir):
    import contextlib
    import io

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.MaxPool2d(3, dilation=2), torch.nn.ReLU()).eval()
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(model, (torch.rand(1, 3, 12, 12),), str(tmp_path / "pool.onnx"), dynamo=False, opset_version=17, input_names=["x"], output_names=["y"])
    out, kept_root = tmp_path / "out", tmp_path / "inspect"
    spec = {"model": {"uri": str(tmp_path / "pool.onnx")}, "inputs": [{"name": "x", "shape": [1, 3, 12, 12]}], "output": str(out)}

    proc = cli("convert", spec, tmp_path, "--keep-failed", str(kept_root))

    assert proc.returncode == 1
    error = proc.stderr.strip()
    assert len(error.splitlines()) == 1 and "output shapes differ" in error
    assert "(MaxPool)" in error and "shape [1, 4, 3, 3] in MNN, [1, 4, 2, 2] in the source" in error
    assert not out.exists() or not any(out.iterdir())  # nothing published
    (kept,) = kept_root.iterdir()
    assert kept.name.startswith("convert-") and kept.name.endswith("-FAILED") and str(kept) in error
    assert {p.name for p in kept.iterdir()} == {"model.onnx", "model.mnn.FAILED", "divergence.md", "FAILED.txt"}
    assert "**yes**" in (kept / "divergence.md").read_text()


def test_version_flag():
    from mnnpipe import __version__

    proc = subprocess.run([sys.executable, "-m", "mnnpipe.cli", "--version"], capture_output=True, text=True, timeout=60)

    assert proc.returncode == 0 and proc.stdout.strip() == f"mnnpipe {__version__}"


def test_reported_cosine_is_clamped_to_one():
    from mnnpipe.verify import compare

    x = np.random.default_rng(2).random(7)
    assert np.dot(x, x) / (np.linalg.norm(x) * np.linalg.norm(x)) > 1.0  # unclamped, rounding goes above 1

    assert compare([x], [x.copy()]).cosine == 1.0


# --------------------------------------------------------------------------- multi-input quantize


class _BagOfTokens(torch.nn.Module):
    """Two int64 inputs (token ids and their mask) -> masked mean of embeddings -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(100, 16)  # MNN leaves embedding tables in float
        self.head = torch.nn.Sequential(torch.nn.Linear(16, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = attention_mask.unsqueeze(-1).float()
        return self.head((self.embed(input_ids) * m).sum(1) / m.sum(1).clamp(min=1.0))


@pytest.mark.parametrize("bits, min_cosine", [(8, 0.999), (4, 0.98)])
def test_two_input_torchscript_model_quantizes_weight_only(bits, min_cosine, tmp_path, cache_dir):
    from mnnpipe.modelio import save_torchscript

    torch.manual_seed(0)
    ids, mask = torch.randint(0, 100, (1, TOKENS)), torch.ones(1, TOKENS, dtype=torch.int64)
    save_torchscript(_BagOfTokens().eval(), (ids, mask), tmp_path / "bag.pt")
    spec = {
        "model": {"uri": str(tmp_path / "bag.pt")},
        "inputs": ENCODER_INPUTS,
        "mode": "weight-only",
        "weights": {"bits": bits},
        "fidelity": {"min_cosine": min_cosine},
        "output": str(tmp_path / "out"),
    }

    proc = cli("quantize", spec, tmp_path)

    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["quantized"]["cosine"] >= min_cosine and result["size_ratio"] < 0.5
    assert any(k.endswith(f"[int{bits}-weights]") for k in result["op_types"]), result["op_types"]
    session = load_session(tmp_path / "out" / "model.mnn")
    assert session.input_names == ["input_ids", "attention_mask"]


def test_transformer_encoder_quantizes_weight_only_int8(encoder, tmp_path, cache_dir):
    from mnnpipe.runner import run_step

    result = run_step("quantize", {"model": encoder["ref"], "inputs": ENCODER_INPUTS, "mode": "weight-only", "output": str(tmp_path / "out")})

    assert result.quantized.cosine > 0.999
    assert any(k.endswith("-weights]") for k in result.op_types)


# --------------------------------------------------------------------------- dynamic and undeclared shapes


def dynamic_conv_model(path: Path) -> Path:
    """Conv with every input dimension but the channels left open (named and -1), as other
    frameworks' exporters write detection/recognition models."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        "dyn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "height", "width"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 4, "height", "width"])],
        [w],
    )
    return _save(graph, path, opset=13, ir_version=8)


def test_dynamic_onnx_dims_are_fixed_to_the_declared_shape_and_recorded(tmp_path, cache_dir):
    from mnnpipe.runner import run_step
    from mnnpipe.steps.quantize import _model_input

    src = dynamic_conv_model(tmp_path / "dyn.onnx")

    result = run_step("convert", {"model": {"uri": str(src)}, "inputs": [{"name": "x", "shape": [1, 3, 48, 192]}], "output": str(tmp_path / "out")})

    assert result.verified_shapes == {"x": [1, 3, 48, 192]}
    assert result.fidelity.max_abs_error < 1e-4
    # the .mnn is static but for the batch, so quantize can calibrate it
    assert _model_input(tmp_path / "out" / "model.mnn") == ("x", (1, 3, 48, 192))


def test_onnx_inputs_are_read_from_the_model_when_the_spec_omits_them(tmp_path, cache_dir):
    from mnnpipe.errors import InputError
    from mnnpipe.runner import run_step

    result = run_step("convert", {"model": {"uri": str(float64_model(tmp_path / "f64.onnx"))}, "output": str(tmp_path / "out")})

    assert result.input_names == ["x"] and result.verified_shapes == {"x": [1, 4]}
    assert result.fidelity.max_abs_error < 1e-5
    with pytest.raises(InputError, match=r"ONNX input 'x' has dynamic dimensions \['\?', 3, '\?', '\?'\]: declare its shape"):
        run_step("convert", {"model": {"uri": str(dynamic_conv_model(tmp_path / "dyn.onnx"))}, "output": str(tmp_path / "o2")})


def test_converter_output_does_not_depend_on_the_onnx_file_path(encoder, tmp_path):
    """An audit saw a transformer convert wrongly from some path lengths. Measured since: the .mnn
    bytes differ between runs only in a random model UUID, and the outputs are identical from any
    path once each converter child has its own working directory (it writes a fixed-name
    external-data file there)."""
    from mnnpipe.engines.mnn import convert_onnx_to_mnn
    from mnnpipe.engines.onnx_export import export_onnx

    ids = np.random.default_rng(0).integers(0, 100, (1, TOKENS)).astype(np.int64)
    mask = np.ones((1, TOKENS), np.int64)
    base = tmp_path / "m.onnx"
    export_onnx(encoder["model"], (torch.from_numpy(ids), torch.from_numpy(mask)), base, input_names=["input_ids", "attention_mask"])
    import shutil
    import tempfile

    short_dir = Path(tempfile.mkdtemp(prefix="p", dir="/tmp"))  # /tmp/pXXXXXXXX: room for short paths
    outputs = []
    try:
        for length in (24, 30, 56, 78, 120):
            src = short_dir / ("a" * (length - len(str(short_dir)) - len("/.onnx")) + ".onnx")
            assert len(str(src)) == length
            shutil.copyfile(base, src)
            convert_onnx_to_mnn(src, tmp_path / f"m{length}.mnn")
            outputs.append(load_session(tmp_path / f"m{length}.mnn").run({"input_ids": ids, "attention_mask": mask})[0])
    finally:
        shutil.rmtree(short_dir)

    assert all(np.array_equal(outputs[0], o) for o in outputs[1:])


def test_an_upgraded_model_onnx_runtime_cannot_run_is_verified_by_onnx_reference(tmp_path, cache_dir):
    """The onnx package ships this opset-6 model: ONNX Runtime refuses it, and the version
    converter's opset-13 graph loads but fails at run time (PRelu, one slope per channel)."""
    import onnx

    from mnnpipe.runner import run_step

    src = Path(onnx.__file__).parent / "backend/test/data/pytorch-converted/test_PReLU_2d_multiparam/model.onnx"

    result = run_step("convert", {"model": {"uri": str(src)}, "output": str(tmp_path / "out")}, use_cache=False, quiet=True)

    assert result.opset == 6
    assert result.fidelity.max_abs_error < 1e-5
