"""Specs of the convert and benchmark steps, and the report helpers: fast, no engines run."""

from __future__ import annotations

import pytest

from mnnpipe.errors import SpecError
from mnnpipe.report import html_report, latency_size_plot, markdown_table
from mnnpipe.runner import parse_spec
from mnnpipe.steps import benchmark, convert
from mnnpipe.steps.convert import WeightCompression

DIGITS = {"uri": "m/digits.pt"}
INPUTS = [{"name": "input", "shape": [1, 1, 8, 8]}]


def convert_spec(**extra):
    return {"model": DIGITS, "inputs": INPUTS, "output": "out/", **extra}


def test_convert_defaults_are_fp32_with_documented_tolerance():
    spec = parse_spec("convert", convert_spec())

    assert spec.weights.lossless
    assert spec.opset == 17 and spec.dynamic_batch
    assert (spec.tolerance.max_abs_error, spec.tolerance.min_cosine, spec.tolerance.min_top1_agreement) == (1e-3, 0.999, 0.99)
    assert spec.weights.converter_kwargs() == {
        "fp16": False,
        "weight_quant_bits": None,
        "weight_quant_asymmetric": False,
        "weight_quant_block": 0,
        "hqq": False,
        "detect_sparse": False,
    }


def test_weight_compression_maps_to_converter_options():
    w = WeightCompression(bits=4, asymmetric=True, block_size=64, hqq=True, detect_sparse=True)

    assert w.converter_kwargs() == {
        "fp16": False,
        "weight_quant_bits": 4,
        "weight_quant_asymmetric": True,
        "weight_quant_block": 64,
        "hqq": True,
        "detect_sparse": True,
    }
    assert not w.lossless


@pytest.mark.parametrize(
    "weights, message",
    [
        ({"fp16": True, "bits": 8}, "weights: fp16 and bits are exclusive"),
        ({"bits": 1}, "weights.bits: Input should be greater than or equal to 2"),
        ({"bits": 9}, "weights.bits: Input should be less than or equal to 8"),
        ({"asymmetric": True}, "weights: asymmetric applies only to weight quantization"),
        ({"hqq": True}, "weights: hqq applies only to weight quantization"),
        ({"block_size": 32}, "weights: block_size applies only to weight quantization"),
        ({"block_size": -1, "bits": 4}, "weights.block_size: Input should be greater than or equal to 0"),
        ({"bitz": 4}, "weights.bitz: unknown field"),
    ],
)
def test_bad_weight_options_name_the_field(weights, message):
    with pytest.raises(SpecError) as e:
        parse_spec("convert", convert_spec(weights=weights))

    assert str(e.value).startswith(message)


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"model": {"uri": "m/model.mnn"}}, "model: convert takes a torch or ONNX model"),
        ({"inputs": []}, "inputs: List should have at least 1 item"),
        ({"inputs": [{"name": "a", "shape": [1, 3]}, {"name": "a", "shape": [1, 3]}]}, "inputs: input names must be unique"),
        ({"inputs": [{"shape": [1, 0, 8, 8]}]}, "inputs.0.shape: shape dimensions must be >= 1"),
        (
            {"inputs": [{"name": "a", "shape": [1, 3]}, {"name": "b", "shape": [1, 3]}], "samples": {"format": "sklearn-digits"}},
            "samples (a dataset) can feed only a single-input model",
        ),
        ({"opset": 9}, "opset: Input should be greater than or equal to 11"),
        ({"num_samples": 0}, "num_samples: Input should be greater than or equal to 1"),
    ],
)
def test_bad_convert_specs_name_the_field(extra, message):
    with pytest.raises(SpecError) as e:
        parse_spec("convert", convert_spec(**extra))

    assert message in str(e.value)


def test_quantize_can_reuse_weight_compression_as_a_field():
    from pydantic import Field

    from mnnpipe.specs import StepSpec

    class Reuser(StepSpec):
        weights: WeightCompression = Field(default_factory=WeightCompression, description="reused")

    assert Reuser(output="o", weights={"bits": 8}).weights.bits == 8


@pytest.mark.parametrize("module", [convert, benchmark])
def test_every_spec_field_is_described(module):
    def undocumented(model_cls, prefix=""):
        out = []
        for name, field in model_cls.model_fields.items():
            if not field.description and name not in ("kind",):
                out.append(prefix + name)
        return out

    assert undocumented(module.Spec) == []
    assert undocumented(WeightCompression) == []
    assert undocumented(benchmark.ModelUnderTest) == []


def bench_spec(**extra):
    models = [{"label": "torch", "model": {"uri": "a.pt"}}, {"label": "mnn", "model": {"uri": "a.mnn"}}]
    return {"models": models, "inputs": INPUTS, "output": "out/", **extra}


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"reference": "nope"}, "reference 'nope' is not one of the model labels"),
        ({"models": [{"label": "x", "model": {"uri": "a.pt"}}, {"label": "x", "model": {"uri": "b.pt"}}]}, "labels must be unique"),
        ({"models": [{"label": "a b", "model": {"uri": "a.pt"}}]}, "models.0.label: label must be"),
        ({"inputs": []}, "inputs: required when there is no dataset"),
        ({"threads": [1, 1]}, "threads: threads must be distinct"),
        ({"threads": [0]}, "threads: threads must be distinct integers in [1, 256]"),
        ({"batch_sizes": []}, "batch_sizes: List should have at least 1 item"),
        ({"precision": "high"}, "precision: Input should be 'normal' or 'low'"),
        ({"iterations": 0}, "iterations: Input should be greater than or equal to 1"),
    ],
)
def test_bad_benchmark_specs_name_the_field(extra, message):
    with pytest.raises(SpecError) as e:
        parse_spec("benchmark", bench_spec(**extra))

    assert message in str(e.value)


def test_benchmark_spec_accepts_a_dataset_without_inputs():
    spec = parse_spec("benchmark", bench_spec(inputs=[], dataset={"format": "sklearn-digits"}, threads=[1, 2], batch_sizes=[1, 4]))

    assert spec.threads == [1, 2] and spec.batch_sizes == [1, 4] and spec.inputs == []


def test_markdown_table_formats_numbers_and_missing_values():
    rows = [{"model": "a", "ms": 12.345, "n": 1234, "cos": None}, {"model": "b|c", "ms": 0.001234, "n": 5, "cos": 0.99}]

    table = markdown_table(rows)

    assert table.splitlines() == [
        "| model | ms | n | cos |",
        "|---|---|---|---|",
        "| a | 12.3 | 1,234 | — |",
        "| b\\|c | 1.23e-03 | 5 | 0.990 |",
    ]


def test_html_report_embeds_the_plot_as_png():
    png = latency_size_plot([{"label": "m", "size_mb": 1.0, "latency_ms": 2.0, "series": "1 thread(s)", "note": "top-1 0.9"}])

    page = html_report("t", [("Rows", [{"model": "<m>", "ms": 1.0}])], png)

    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert "src='data:image/png;base64,iVBORw0KGgo" in page
    assert "&lt;m&gt;" in page and "<m>" not in page
