"""The benchmark step end to end: torch, ONNX Runtime and MNN side by side; JSON, Markdown, HTML."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys

import pytest
import torch

from mnnpipe.errors import InputError
from mnnpipe.modelio import save_torchscript
from mnnpipe.models import digits_cnn
from mnnpipe.runner import run_step

pytestmark = pytest.mark.integration

DIGITS_TEST = {"format": "sklearn-digits", "split": "test", "limit": 60, "preprocess": {"channels": "GRAY"}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A digits CNN as TorchScript, plus the model.onnx / model.mnn the convert step made of it."""
    root = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    save_torchscript(digits_cnn().eval(), (torch.rand(1, 1, 8, 8),), root / "digits.pt")
    conv = run_step("convert", {"model": {"uri": str(root / "digits.pt")}, "inputs": [{"shape": [1, 1, 8, 8]}], "output": str(root / "conv")})
    return {"torch": str(root / "digits.pt"), "onnx": conv.artifacts["model.onnx"].uri, "mnn": conv.artifacts["model.mnn"].uri, "root": root}


def model_list(models):
    return [{"label": k, "model": {"uri": models[k]}} for k in ("torch", "onnx", "mnn")]


def test_benchmark_on_a_labelled_set_emits_json_markdown_and_html(models, tmp_path, cache_dir):
    out = tmp_path / "out"

    result = run_step(
        "benchmark",
        {
            "models": model_list(models),
            "dataset": DIGITS_TEST,
            "threads": [1, 2],
            "batch_sizes": [1, 3],
            "warmup": 1,
            "iterations": 3,
            "reference": "torch",
            "output": str(out),
        },
    )

    assert {"metrics.json", "report.md", "report.html"} <= set(result.artifacts)
    assert [(r.label, r.threads, r.batch) for r in result.rows] == [
        (m, t, b) for m in ("torch", "onnx", "mnn") for t in (1, 2) for b in (1, 3)
    ]
    assert all(0 < r.p50_ms <= r.p99_ms and r.iterations == 3 for r in result.rows)
    by = {s.label: s for s in result.models}
    assert result.eval_samples == 60
    # same weights in three runtimes: the same predictions, so the same accuracy
    assert by["torch"].top1 == by["onnx"].top1 == by["mnn"].top1 is not None
    assert by["mnn"].top5 >= by["mnn"].top1
    assert by["mnn"].fidelity.cosine > 0.99999 and by["mnn"].fidelity.top1_agreement == 1.0
    assert by["torch"].fidelity is None
    assert all(s.peak_rss_delta_bytes > 0 for s in result.models)
    assert by["mnn"].size_bytes == (models["root"] / "conv" / "model.mnn").stat().st_size

    metrics = json.loads((out / "metrics.json").read_text())
    assert all(isinstance(v, float) for v in metrics["metrics"].values())
    assert metrics["metrics"]["mnn/top1"] == by["mnn"].top1
    assert metrics["metrics"]["onnx/t2_b3/p50_ms"] == pytest.approx(result.rows[7].p50_ms, abs=1e-4)
    assert len(metrics["rows"]) == 12 and metrics["memory_method"].startswith("peak RSS")
    assert all(result.metrics[k] == v for k, v in metrics["metrics"].items())  # the result carries the same numbers

    md = (out / "report.md").read_text()
    assert "| model | format | size MB |" in md and re.search(r"^\| mnn \| mnn \| 2 \| 3 \|", md, re.M)
    html = (out / "report.html").read_text()
    png = base64.b64decode(re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html).group(1))
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert "<td>onnx</td>" in html


def test_benchmark_with_random_inputs_compares_against_the_reference(models, tmp_path, cache_dir):
    result = run_step(
        "benchmark",
        {
            "models": model_list(models)[1:],
            "inputs": [{"name": "input", "shape": [1, 1, 8, 8]}],
            "warmup": 0,
            "iterations": 2,
            "reference": "onnx",
            "num_samples": 5,
            "output": str(tmp_path / "out"),
        },
    )

    by = {s.label: s for s in result.models}
    assert result.eval_samples == 5 and by["mnn"].fidelity.samples == 5
    assert by["mnn"].fidelity.max_abs_error < 1e-4
    assert by["mnn"].top1 is None  # no labels, no accuracy


def test_an_mnn_file_that_fails_to_load_is_an_input_error_and_nothing_is_published(models, tmp_path, cache_dir):
    bad = tmp_path / "broken.mnn"
    bad.write_bytes(b"\x00garbage" * 100)
    out = tmp_path / "out"

    with pytest.raises(InputError, match=r"models\[broken\]: not a loadable MNN model"):
        run_step(
            "benchmark",
            {"models": [{"label": "broken", "model": {"uri": str(bad)}}], "inputs": [{"shape": [1, 1, 8, 8]}], "iterations": 1, "output": str(out)},
        )

    assert not out.exists() or not any(out.iterdir())


def test_cli_runs_benchmark_and_rejects_an_unknown_reference(models, tmp_path, cache_dir):
    spec = {"models": model_list(models)[2:], "inputs": [{"shape": [1, 1, 8, 8]}], "iterations": 2, "output": str(tmp_path / "out")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    base = [sys.executable, "-m", "mnnpipe.cli", "--quiet", "run", "benchmark", "--spec", str(tmp_path / "spec.json")]

    ok = subprocess.run(base, capture_output=True, text=True, timeout=300)
    bad = subprocess.run([*base, "--set", "reference=nope"], capture_output=True, text=True, timeout=300)

    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["rows"][0]["label"] == "mnn"
    assert bad.returncode == 2 and "reference 'nope' is not one of the model labels" in bad.stderr
