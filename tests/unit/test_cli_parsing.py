"""Spec files and --set overrides: what the container entrypoint reads before any step runs."""

import pytest

from mnnpipe.cli import apply_override, load_spec_file, main, parse_spec_text
from mnnpipe.errors import SpecError


def test_yaml_and_json_specs_load(tmp_path):
    (tmp_path / "s.yaml").write_text("output: out\nmodel:\n  uri: m.pt\n")
    (tmp_path / "s.json").write_text('{"output": "out", "model": {"uri": "m.pt"}}')
    assert load_spec_file(str(tmp_path / "s.yaml")) == load_spec_file(str(tmp_path / "s.json"))


def test_set_overrides_nested_values_with_types():
    data = {"tolerance": {"min_cosine": 0.9}, "inputs": [{"shape": [1, 3]}]}
    apply_override(data, "tolerance.min_cosine=0.99")
    apply_override(data, "inputs.0.shape=[1, 1, 8, 8]")
    apply_override(data, "fp16=true")
    apply_override(data, "new.deep.key=text")
    assert data == {
        "tolerance": {"min_cosine": 0.99},
        "inputs": [{"shape": [1, 1, 8, 8]}],
        "fp16": True,
        "new": {"deep": {"key": "text"}},
    }


@pytest.mark.parametrize(
    "assignment, message",
    [("noequals", "expected key.path=value"), ("a..b=1", "empty key"), ("inputs.5.x=1", "not an index"), ("scalar.x=1", "not a mapping")],
)
def test_bad_overrides_name_the_problem(assignment, message):
    data = {"inputs": [{}], "scalar": 3}
    with pytest.raises(SpecError, match=message):
        apply_override(data, assignment)


def test_bad_yaml_reports_line(tmp_path):
    with pytest.raises(SpecError, match="line 3"):
        parse_spec_text("a: 1\nb: [unclosed\n", "--spec x.yaml")  # YAML reports the end of the open flow sequence


def test_non_mapping_spec_is_rejected():
    with pytest.raises(SpecError, match="expected a mapping"):
        parse_spec_text("- 1\n- 2\n", "--spec x.yaml")


def test_missing_spec_file_exits_2_with_one_line(tmp_path, capsys):
    code = main(["run", "convert", "--spec", str(tmp_path / "absent.yaml")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "absent.yaml" in err and "not found" in err
