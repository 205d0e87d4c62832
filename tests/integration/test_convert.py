"""The convert step end to end: torch/ONNX -> ONNX -> .mnn, verified, via run_step, the CLI and S3."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mnnpipe.engines.mnn import load_session
from mnnpipe.errors import InputError, StepFailed, ToolError
from mnnpipe.modelio import save_exported, save_torchscript
from mnnpipe.models import digits_cnn
from mnnpipe.runner import run_step

pytestmark = pytest.mark.integration

DIGITS_INPUT = [{"name": "input", "shape": [1, 1, 8, 8]}]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """One digits CNN saved as TorchScript, .pt2, state-dict and ONNX (via the step itself)."""
    root = tmp_path_factory.mktemp("digits")
    torch.manual_seed(0)
    model = digits_cnn().eval()
    example = (torch.rand(1, 1, 8, 8),)
    save_torchscript(model, example, root / "digits.pt")
    save_exported(model, example, root / "digits.pt2")
    torch.save(model.state_dict(), root / "digits.pth")
    return {"model": model, "root": root}


def refs(digits) -> dict[str, dict]:
    root = digits["root"]
    return {
        "torchscript": {"uri": str(root / "digits.pt")},
        "torch-export": {"uri": str(root / "digits.pt2")},
        "state-dict": {"uri": str(root / "digits.pth"), "factory": "mnnpipe.models:digits_cnn"},
    }


def published(out: Path) -> set[str]:
    return {p.name for p in out.iterdir()} if out.exists() else set()


@pytest.mark.parametrize("fmt", ["torchscript", "torch-export", "state-dict"])
def test_torch_formats_convert_and_the_published_mnn_matches_torch(digits, fmt, tmp_path, cache_dir):
    out = tmp_path / "out"

    result = run_step("convert", {"model": refs(digits)[fmt], "inputs": DIGITS_INPUT, "output": str(out)})

    assert {"model.mnn", "model.onnx", "manifest.json", "result.json"} <= published(out)
    assert result.source_format == fmt
    assert result.fidelity.max_abs_error < 1e-4 and result.fidelity.top1_agreement == 1.0
    assert result.mnn_bytes == (out / "model.mnn").stat().st_size
    assert result.onnx_bytes == (out / "model.onnx").stat().st_size
    assert result.input_names == ["input"] and result.output_names == ["output"] and result.opset == 17
    # a fresh input, batch 4 (dynamic batch), through the published file
    x = np.random.default_rng(7).random((4, 1, 8, 8), dtype=np.float32)
    got = load_session(out / "model.mnn").run({"input": x})[0]
    np.testing.assert_allclose(got, digits["model"](torch.from_numpy(x)).detach().numpy(), atol=1e-5)


def test_onnx_source_converts_with_8bit_weights_and_dataset_samples(digits, tmp_path, cache_dir):
    first = run_step("convert", {"model": refs(digits)["torchscript"], "inputs": DIGITS_INPUT, "output": str(tmp_path / "fp32")})
    onnx_uri = first.artifacts["model.onnx"].uri

    result = run_step(
        "convert",
        {
            "model": {"uri": onnx_uri},
            "inputs": DIGITS_INPUT,
            "weights": {"bits": 8},
            "tolerance": {"max_abs_error": None, "min_cosine": 0.999, "min_top1_agreement": 0.95},
            "samples": {"format": "sklearn-digits", "split": "test", "preprocess": {"channels": "GRAY"}},
            "num_samples": 40,
            "output": str(tmp_path / "w8"),
        },
    )

    assert result.source_format == "onnx" and result.fidelity.samples == 40
    assert result.converter_options["weight_quant_bits"] == 8
    assert result.mnn_bytes < 0.35 * first.mnn_bytes  # 8-bit weights: about a quarter
    assert result.fidelity.cosine >= 0.999


@pytest.mark.parametrize("factory, kwargs", [("mobilenet_v2", {"width": 0.35, "num_classes": 10}), ("resnet18", {"width": 0.25, "num_classes": 10})])
def test_reference_architectures_convert_at_64x64(factory, kwargs, tmp_path, cache_dir):
    from mnnpipe.models import ARCHITECTURES

    torch.manual_seed(0)
    torch.save(ARCHITECTURES[factory](**kwargs).state_dict(), tmp_path / "m.pth")

    result = run_step(
        "convert",
        {
            "model": {"uri": str(tmp_path / "m.pth"), "factory": f"mnnpipe.models:{factory}", "factory_kwargs": kwargs},
            "inputs": [{"name": "image", "shape": [1, 3, 64, 64]}],
            "num_samples": 4,
            "output": str(tmp_path / "out"),
        },
    )

    assert result.fidelity.cosine > 0.99999 and result.fidelity.max_abs_error < 1e-4
    assert result.input_names == ["image"]


def test_fidelity_beyond_tolerance_fails_and_publishes_nothing(digits, tmp_path, cache_dir):
    out = tmp_path / "out"

    with pytest.raises(StepFailed, match="fp16 weights.*outside the tolerance: max abs error"):
        run_step(
            "convert",
            {"model": refs(digits)["torchscript"], "inputs": DIGITS_INPUT, "weights": {"fp16": True}, "tolerance": {"max_abs_error": 0.0}, "output": str(out)},
        )

    assert published(out) == set()


def test_wrong_input_shape_is_an_input_error_naming_the_input(digits, tmp_path, cache_dir):
    with pytest.raises(InputError, match=r"inputs: declared 'input' \[1, 3, 8, 8\] do not fit the model"):
        run_step("convert", {"model": refs(digits)["torchscript"], "inputs": [{"shape": [1, 3, 8, 8]}], "output": str(tmp_path / "o")})

    assert published(tmp_path / "o") == set()


def test_wrong_input_shape_for_an_onnx_source_names_the_input(digits, tmp_path, cache_dir):
    first = run_step("convert", {"model": refs(digits)["torchscript"], "inputs": DIGITS_INPUT, "output": str(tmp_path / "fp32")})

    with pytest.raises(InputError, match=r"input 'input' is declared \[1, 1, 9, 9\] but the ONNX model expects \['\?', 1, 8, 8\]"):
        run_step("convert", {"model": {"uri": first.artifacts["model.onnx"].uri}, "inputs": [{"shape": [1, 1, 9, 9]}], "output": str(tmp_path / "o")})


@pytest.mark.parametrize("name", ["digits.pt", "digits.pt2", "digits.onnx"])
def test_truncated_model_files_are_input_errors(digits, name, tmp_path, cache_dir):
    src = digits["root"] / ("digits.pt" if name == "digits.onnx" else name)
    if name == "digits.onnx":
        run_step("convert", {"model": {"uri": str(src)}, "inputs": DIGITS_INPUT, "output": str(tmp_path / "fp32")})
        src = tmp_path / "fp32" / "model.onnx"
    data = src.read_bytes()
    bad = tmp_path / name
    bad.write_bytes(data[: len(data) // 3])

    with pytest.raises(InputError, match="not a loadable"):
        run_step("convert", {"model": {"uri": str(bad)}, "inputs": DIGITS_INPUT, "output": str(tmp_path / "o")})

    assert published(tmp_path / "o") == set()


def test_missing_model_uri_is_an_input_error(tmp_path, cache_dir):
    with pytest.raises(InputError, match="no such file"):
        run_step("convert", {"model": {"uri": str(tmp_path / "absent.pt")}, "inputs": DIGITS_INPUT, "output": str(tmp_path / "o")})


class _Svd(torch.nn.Module):
    def forward(self, x):
        return torch.linalg.svd(x[0, 0])[1]


def test_unsupported_op_is_a_tool_error(tmp_path, cache_dir):
    save_torchscript(_Svd(), (torch.rand(1, 1, 4, 4),), tmp_path / "svd.pt")

    with pytest.raises(ToolError, match="torch.onnx.export failed.*linalg_svd"):
        run_step("convert", {"model": {"uri": str(tmp_path / "svd.pt")}, "inputs": [{"shape": [1, 1, 4, 4]}], "output": str(tmp_path / "o")})

    assert published(tmp_path / "o") == set()


def cli(spec: dict, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return subprocess.run(
        [sys.executable, "-m", "mnnpipe.cli", "--quiet", "run", "convert", "--spec", str(path), "--no-cache", *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_exit_codes_and_nothing_published_on_failure(digits, tmp_path, cache_dir):
    ok_out, fail_out, bad_out, corrupt_out = (tmp_path / n for n in ("ok", "fail", "bad", "corrupt"))
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    base = {"model": refs(digits)["torchscript"], "inputs": DIGITS_INPUT}

    ok = cli({**base, "output": str(ok_out)}, tmp_path, "--result", str(tmp_path / "r.json"))
    fail = cli({**base, "output": str(fail_out)}, tmp_path, "--set", "weights.fp16=true", "--set", "tolerance.max_abs_error=0")
    bad = cli({**base, "inputs": [{"shape": [1, 2, 8, 8]}], "output": str(bad_out)}, tmp_path)
    corrupt = cli({**base, "model": {"uri": str(tmp_path / "junk.pt")}, "output": str(corrupt_out)}, tmp_path)

    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "r.json").read_text())["mnn_bytes"] == (ok_out / "model.mnn").stat().st_size
    assert fail.returncode == 1 and "outside the tolerance" in fail.stderr
    assert bad.returncode == 2 and "'input' [1, 2, 8, 8]" in bad.stderr
    assert corrupt.returncode == 2 and "not a loadable torchscript model" in corrupt.stderr
    assert published(fail_out) == published(bad_out) == published(corrupt_out) == set()


def test_s3_round_trip(digits, s3_server, s3_bucket, cache_dir, tmp_path):
    client = s3_server.client()
    client.upload_file(str(digits["root"] / "digits.pt"), s3_bucket, "models/digits.pt")

    result = run_step(
        "convert",
        {"model": {"uri": f"s3://{s3_bucket}/models/digits.pt"}, "inputs": DIGITS_INPUT, "output": f"s3://{s3_bucket}/converted"},
    )

    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="converted/")["Contents"]}
    assert {"converted/model.mnn", "converted/model.onnx", "converted/manifest.json", "converted/result.json"} <= keys
    assert result.artifacts["model.mnn"].uri == f"s3://{s3_bucket}/converted/model.mnn"
    client.download_file(s3_bucket, "converted/model.mnn", str(tmp_path / "model.mnn"))
    assert (tmp_path / "model.mnn").stat().st_size == result.mnn_bytes
    x = np.random.default_rng(1).random((1, 1, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(
        load_session(tmp_path / "model.mnn").run({"input": x})[0], digits["model"](torch.from_numpy(x)).detach().numpy(), atol=1e-5
    )
