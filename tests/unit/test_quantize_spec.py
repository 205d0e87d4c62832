"""quantize Spec validation, calibration layouts and the greedy layer search (no MNN runs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mnnpipe.calibration import write_calibration
from mnnpipe.data import Dataset
from mnnpipe.errors import InputError, SpecError
from mnnpipe.runner import parse_spec
from mnnpipe.sensitivity import Evaluation, LayerSensitivity, greedy_float_layers, measure, to_markdown
from mnnpipe.specs import Preprocess

CALIB = {"format": "sklearn-digits", "split": "train", "preprocess": {"channels": "GRAY"}}
EVAL = {"format": "sklearn-digits", "split": "test", "preprocess": {"channels": "GRAY"}}
BASE = {"model": {"uri": "m.mnn"}, "calibration": CALIB, "evaluation": EVAL, "output": "out"}


def test_defaults_are_full_int8_kl_with_a_half_point_budget():
    spec = parse_spec("quantize", BASE)

    assert (spec.mode, spec.activation_method, spec.weight_method) == ("full-int8", "KL", "MAX_ABS")
    assert spec.max_accuracy_drop == 0.5 and spec.per_channel_weights


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"activation_method": "ADMM"}, "activation_method: .*crashes MNN 3.6.1"),
        ({"per_channel_weights": False}, "per_channel_weights: .*always scales conv weights per output channel"),
        ({"calibration": None}, "calibration is required for mode 'full-int8'"),
        ({"mode": "fp16"}, "mode 'fp16' is applied by the converter"),
        ({"model": {"uri": "m.pth", "factory": "mnnpipe.models:digits_cnn"}}, "input .* is required to export a torch model"),
        ({"skip_layers": ["a", "a"]}, "skip_layers: .*duplicates"),
        ({"max_accuracy_drop": 101}, "max_accuracy_drop: .*less than or equal to 100"),
        ({"calibration_samples": 0}, "calibration_samples"),
        ({"mode": "weight-only", "model": {"uri": "m.onnx"}, "calibration": None, "weights": {"fp16": True}}, "needs weights.bits"),
        ({"mode": "weight-only", "model": {"uri": "m.onnx"}, "calibration": CALIB}, "calibration applies to modes full-int8 / qat, not weight-only"),
        ({"mode": "fp16", "model": {"uri": "m.onnx"}, "calibration": None, "sensitivity": True}, "sensitivity applies to mode full-int8 only, not fp16"),
        ({"mode": "fp16", "model": {"uri": "m.onnx"}, "calibration": None, "weights": {"bits": 8}}, "mode 'fp16' needs weights.fp16 true"),
        ({"evaluation": None}, "evaluation is required for mode 'full-int8' unless inputs is given"),
        ({"calibration_ladder": "auto", "inputs": [{"name": "a", "shape": [1, 4]}], "evaluation": None}, "calibration_ladder auto applies to a single-input model"),
        ({"weights": {"bits": 8}}, "weights applies to modes weight-only / fp16"),
        ({"surprise": 1}, "surprise: unknown field"),
    ],
)
def test_bad_specs_fail_with_a_message_naming_the_field(overrides, message):
    with pytest.raises(SpecError, match=message):
        parse_spec("quantize", {**BASE, **overrides})


QAT = {**BASE, "mode": "qat", "model": {"uri": "m.pth", "factory": "pkg.mod:fn"}, "input": {"name": "input", "shape": [1, 1, 8, 8]}}


def test_every_problem_with_the_mode_is_reported_at_once_naming_field_and_mode():
    with pytest.raises(SpecError) as exc:
        parse_spec("quantize", {**QAT, "inputs": [{"name": "a", "shape": [1, 4]}], "input": None, "skip_layers": ["c"], "weights": {"bits": 8}})

    for part in ("inputs applies to modes full-int8 / weight-only / fp16, not qat", "weights applies to modes weight-only / fp16, not qat",
                 "skip_layers applies to mode full-int8 only, not qat"):  # fmt: skip
        assert part in str(exc.value)
    assert "\n" not in str(exc.value)  # one line: the CLI prints a spec error on one line


def test_fields_a_mode_ignores_are_accepted_so_a_search_can_switch_the_mode():
    spec = parse_spec("quantize", {**BASE, "mode": "weight-only", "model": {"uri": "m.onnx"}, "calibration": None, "calibration_samples": 200, "qat_epochs": 3})

    assert spec.mode == "weight-only" and spec.weights is None and spec.calibration_samples == 200


def test_the_mode_table_covers_every_mode_with_known_uses_of_real_fields():
    from mnnpipe.steps.quantize import _MODE_FIELDS, _MODE_MODEL_FORMATS, _MODE_WEIGHTS, _MODES, _SINGLE_INPUT_ONLY, Spec

    assert _MODES == ("full-int8", "qat", "weight-only", "fp16") and set(_MODE_MODEL_FORMATS) == set(_MODES)
    for field, uses in _MODE_FIELDS.items():
        assert field in Spec.model_fields and tuple(uses) == _MODES, field
        assert set(uses.values()) <= {"required", "required*", "optional", "ignored", "rejected"}, field
        assert any(u not in ("rejected", "ignored") for u in uses.values()), f"{field} is used by no mode"
    assert set(_MODE_WEIGHTS) == {m for m in _MODES if _MODE_FIELDS["weights"][m] == "optional"}
    assert set(_SINGLE_INPUT_ONLY) <= set(Spec.model_fields)


def test_the_schema_documents_per_mode_which_fields_apply_and_checks_it():
    jsonschema = pytest.importorskip("jsonschema")
    from mnnpipe.steps.quantize import Spec

    schema = Spec.model_json_schema()
    props = schema["properties"]
    assert props["weights"]["x-modes"] == {"full-int8": "rejected", "qat": "rejected", "weight-only": "optional", "fp16": "optional"}
    assert props["calibration"]["x-modes"]["full-int8"] == "required unless inputs"
    validator = jsonschema.Draft202012Validator(schema)
    wo = {**BASE, "mode": "weight-only", "model": {"uri": "m.onnx"}}
    del wo["calibration"]
    for good in (BASE, wo, {**wo, "weights": {"bits": 4}}, QAT):
        assert validator.is_valid(good), good
    for bad in ({**wo, "calibration": CALIB}, {**wo, "weights": {"fp16": True}}, {**BASE, "weights": {"bits": 8}},
                {**QAT, "skip_layers": ["c"]}, {k: v for k, v in BASE.items() if k != "calibration"}):  # fmt: skip
        assert not validator.is_valid(bad), bad


def test_weight_only_reuses_the_convert_steps_weight_sub_spec():
    from mnnpipe.steps.convert import WeightCompression

    spec = parse_spec("quantize", {**BASE, "mode": "weight-only", "model": {"uri": "m.onnx"}, "calibration": None, "weights": {"bits": 4, "hqq": True}})

    assert isinstance(spec.weights, WeightCompression) and spec.weights.bits == 4


def test_every_spec_field_is_described_in_the_schema():
    from mnnpipe.steps.quantize import Spec

    props = Spec.model_json_schema()["properties"]

    assert all(p.get("description") for name, p in props.items()), [n for n, p in props.items() if not p.get("description")]
    assert "PERCENTAGE POINTS" in props["max_accuracy_drop"]["description"]


def _images(n=3, h=4, w=5, c=3) -> Dataset:
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)
    x = raw.transpose(0, 3, 1, 2).astype(np.float32)
    return Dataset(x, None, (), raw)


def test_image_calibration_redoes_our_normalisation_in_mnns_terms(tmp_path):
    p = Preprocess(channels="BGR", scale=255.0, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    data = _images()

    cal = write_calibration(data, tmp_path, p, input_name="input", input_shape=(1, 3, 4, 5), limit=2)

    assert cal.layout == "images" and cal.samples == 2 and len(list(tmp_path.glob("*.png"))) == 2
    assert cal.config["format"] == "BGR" and (cal.config["width"], cal.config["height"]) == (5, 4)
    raw = data.raw[0].astype(np.float64)
    want = (raw / 255 - np.array(p.mean)) / np.array(p.std)
    mnn = (raw - np.array(cal.config["mean"])) * np.array(cal.config["normal"])
    np.testing.assert_allclose(mnn, want, rtol=1e-6)
    # Dataset.raw is in model (BGR) order; the file must be RGB so MNN's own swap lands right.
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "000000.png")), data.raw[0][..., ::-1])


def test_non_image_data_is_written_as_sequence_folders(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(2, 6) / 7
    data = Dataset(x, None, (), None)

    cal = write_calibration(data, tmp_path, Preprocess(), input_name="feats", input_shape=(1, 6), limit=10)

    assert cal.layout == "sequence" and cal.config["input_type"] == "sequence" and cal.samples == 2
    assert json.loads((tmp_path / "000001" / "input.json").read_text()) == {"inputs": [{"name": "feats", "shape": [1, 6]}]}
    np.testing.assert_array_equal(np.loadtxt(tmp_path / "000001" / "feats.txt", dtype=np.float32), x[1])


def test_calibration_that_does_not_fit_the_model_input_is_rejected(tmp_path):
    with pytest.raises(InputError, match=r"samples have shape \[3, 4, 5\] but the model's input 'input' takes \[1, 8, 8\]"):
        write_calibration(_images(), tmp_path, Preprocess(), input_name="input", input_shape=(1, 1, 8, 8), limit=4)


def _ev(drop: float, cosine: float = 0.999) -> Evaluation:
    return Evaluation(cosine=cosine, accuracy=0.9 - drop / 100, accuracy_drop_pp=drop, top1_agreement=0.99)


def test_measure_ranks_layers_by_the_accuracy_they_lose_alone():
    layers = [("a", "Convolution"), ("b", "Convolution"), ("c", "ConvolutionDepthwise")]
    drop_alone = {"a": 0.1, "b": 2.0, "c": 0.1}
    cos_alone = {"a": 0.99, "b": 0.999, "c": 0.9999}

    def evaluate(skip):
        (quantized,) = {"a", "b", "c"} - set(skip)
        return _ev(drop_alone[quantized], cos_alone[quantized])

    rows = measure(layers, evaluate)

    assert [r.layer for r in rows] == ["b", "a", "c"]


def test_greedy_keeps_the_most_sensitive_layers_in_float_until_within_budget():
    ranked = [LayerSensitivity(layer=n, op_type="Convolution", alone=_ev(d)) for n, d in (("b", 2.0), ("a", 0.3), ("c", 0.1))]
    drops = {(): 2.5, ("b",): 0.6, ("a", "b"): 0.2}

    skip, final, attempts = greedy_float_layers(ranked, lambda s: _ev(drops[tuple(sorted(s))]), lambda e: e.accuracy_drop_pp <= 0.5)

    assert skip == ["b", "a"] and final.accuracy_drop_pp == 0.2 and len(attempts) == 3


def test_greedy_reports_the_unmet_budget_after_trying_every_layer():
    ranked = [LayerSensitivity(layer=n, op_type="Convolution", alone=_ev(1.0)) for n in ("x", "y")]

    skip, final, attempts = greedy_float_layers(ranked, lambda s: _ev(3.0), lambda e: e.accuracy_drop_pp <= 0.5, always_skip=["u"])

    assert skip == ["u", "x", "y"] and final.accuracy_drop_pp == 3.0 and len(attempts) == 3


def test_markdown_table_marks_float_layers():
    rows = [LayerSensitivity(layer="conv1", op_type="Convolution", alone=_ev(1.25), debug_cosine=0.99)]

    text = to_markdown(rows, ["conv1"])

    assert "| 1 | `conv1` | Convolution | 1.25 | 0.999000 | 0.9900 | 0.990000 | yes |" in text
