"""The distill Spec: valid specs parse; each invalid one fails naming the field (exit 2 on the CLI)."""

import json
import subprocess
import sys

import pytest
import yaml

from mnnpipe.cli import main
from mnnpipe.errors import SpecError
from mnnpipe.runner import parse_spec
from mnnpipe.steps import distill


def spec_dict(**overrides):
    base = {
        "output": "out/distill",
        "teacher": {"uri": "teacher.pth", "factory": "mnnpipe.models:digits_cnn"},
        "student": {"architecture": "digits_cnn", "width": 0.5},
        "dataset": {"format": "sklearn-digits", "preprocess": {"channels": "GRAY"}},
    }
    base.update(overrides)
    return base


def test_minimal_spec_parses_with_documented_defaults():
    spec = parse_spec("distill", spec_dict())

    assert spec.kind == "distill"
    assert (spec.temperature, spec.alpha, spec.baseline, spec.features) == (4.0, 0.9, False, [])
    assert spec.training.optimizer == "adamw" and spec.training.epochs == 20
    assert spec.student.width == 0.5 and spec.teacher.format == "state-dict"


def test_architecture_choices_are_exactly_the_reference_architectures():
    from typing import get_args

    from mnnpipe.models import ARCHITECTURES

    assert set(get_args(distill.Architecture)) == set(ARCHITECTURES)


def test_every_spec_field_is_described_in_the_schema():
    schema = distill.Spec.model_json_schema()
    undocumented = [
        f"{where}.{name}"
        for where, body in [("Spec", schema), *schema.get("$defs", {}).items()]
        if where in ("Spec", "Student", "FeaturePair", "Training")
        for name, prop in body["properties"].items()
        if name != "kind" and "description" not in prop
    ]

    assert undocumented == []


@pytest.mark.parametrize(
    "overrides, field, message",
    [
        ({"temperature": 0}, "temperature", "must be > 0"),
        ({"temperature": -2.0}, "temperature", "must be > 0"),
        ({"alpha": -0.1}, "alpha", r"must be in \[0, 1\]"),
        ({"alpha": 1.01}, "alpha", r"must be in \[0, 1\]"),
        ({"teacher": {"uri": "teacher.onnx"}}, "teacher", "cannot be run in torch"),
        ({"dataset": {"format": "sklearn-digits", "split": "train"}}, "dataset", "split must be 'all'"),
        ({"student": {}}, "student", "exactly one of architecture, factory or model"),
        (
            {"student": {"architecture": "digits_cnn", "factory": "mnnpipe.models:digits_cnn"}},
            "student",
            "exactly one",
        ),
        ({"student": {"factory": "mnnpipe.models:digits_cnn", "width": 0.5}}, "student", "width applies only"),
        ({"student": {"model": {"uri": "s.mnn"}}}, "student.model", "cannot be trained"),
        ({"student": {"model": {"uri": "s.pt2"}}}, "student.model", "cannot be trained"),
        ({"student": {"factory": "not a factory"}}, "student.factory", "pkg.module:callable"),
        ({"student": {"architecture": "vgg16"}}, "student.architecture", "digits_cnn"),
        ({"training": {"epochs": 0}}, "training.epochs", "greater than or equal to 1"),
        ({"training": {"optimizer": "rmsprop"}}, "training.optimizer", "adamw"),
        ({"colour": "red"}, "colour", "unknown field"),
    ],
)
def test_invalid_specs_name_the_field(overrides, field, message):
    with pytest.raises(SpecError, match=message) as err:
        parse_spec("distill", spec_dict(**overrides))

    assert str(err.value).startswith(f"{field}:")


@pytest.mark.parametrize(
    "teacher, student, message",
    [
        ({"uri": "teacher.pt"}, {"architecture": "digits_cnn"}, "torchscript teacher does not support"),
        ({"uri": "teacher.pt2"}, {"architecture": "digits_cnn"}, "torch-export teacher does not support"),
        (
            {"uri": "t.pth", "factory": "mnnpipe.models:digits_cnn"},
            {"model": {"uri": "pruned.pt"}},
            "torchscript student does not support",
        ),
    ],
)
def test_feature_distillation_needs_hookable_models(teacher, student, message):
    data = spec_dict(teacher=teacher, student=student, features=[{"student": "features.3", "teacher": "features.3"}])

    with pytest.raises(SpecError, match=message) as err:
        parse_spec("distill", data)

    assert str(err.value).startswith("features:")


def test_torchscript_teacher_and_student_are_fine_without_feature_pairs():
    spec = parse_spec("distill", spec_dict(teacher={"uri": "teacher.pt"}, student={"model": {"uri": "pruned.pt"}}))

    assert spec.teacher.format == "torchscript" and spec.student.model.format == "torchscript"


def test_cli_rejects_bad_temperature_with_exit_2_and_one_line(tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict(output=str(tmp_path / "out"), temperature=0)))

    code = main(["run", "distill", "--spec", str(path)])

    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert err.startswith("error: temperature:")
    assert not (tmp_path / "out").exists()


def test_cli_subprocess_rejects_alpha_outside_unit_interval(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec_dict(output=str(tmp_path / "out"))))

    proc = subprocess.run(
        [sys.executable, "-m", "mnnpipe.cli", "run", "distill", "--spec", str(path), "--set", "alpha=1.5"],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: alpha: alpha must be in [0, 1]")
