"""Spec text is parsed within limits (size, nesting depth, nodes with aliases expanded), wherever
it enters: --spec files, --spec-json, --set values and the KFP launcher's spec parameter."""

from __future__ import annotations

import pytest

from mnnpipe import cli, spectext
from mnnpipe.cli import apply_override, load_spec_file, load_yaml, parse_spec_text
from mnnpipe.errors import SpecError
from mnnpipe.kfp.launcher import bind_spec


def laughs(levels: int, fanout: int = 10) -> str:
    """Anchors l0..l<levels-1>, each a list of `fanout` aliases of the one before."""
    text = f"l0: &l0 [{', '.join(['lol'] * fanout)}]\n"
    return text + "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fanout)}]\n" for i in range(1, levels))


def test_nesting_up_to_the_limit_parses_and_one_more_level_is_refused():
    # a scalar inside k-1 lists is k nodes deep
    assert load_yaml("[" * (cli.SPEC_MAX_DEPTH - 1) + "]" * (cli.SPEC_MAX_DEPTH - 1), "s") is not None

    with pytest.raises(SpecError, match=r"^s: nested deeper than 64 levels \(at line 1\)"):
        load_yaml("[" * 50_000 + "]" * 50_000, "s")


def test_aliases_are_counted_as_what_they_expand_to(monkeypatch):
    monkeypatch.setattr(spectext, "SPEC_MAX_NODES", 1000)
    assert set(load_yaml(laughs(2), "s")) == {"l0", "l1"}  # l0: 11 nodes, l1: 1 + 10 * 11, with keys 125: fine

    with pytest.raises(SpecError, match=r"^s: more than 1000 values once YAML aliases are expanded"):
        load_yaml(laughs(3), "s")  # l2 alone stands for 10 * 111 nodes


def test_a_billion_laughs_is_refused_at_the_default_limit():
    with pytest.raises(SpecError, match="aliases are expanded"):
        parse_spec_text(laughs(10), "--spec bomb.yaml")


def test_a_recursive_alias_is_refused():
    with pytest.raises(SpecError, match="recursive"):
        load_yaml("a: &a {b: *a}\n", "s")


def test_a_spec_file_over_the_size_limit_is_refused_without_reading_all_of_it(tmp_path, monkeypatch):
    monkeypatch.setattr(spectext, "SPEC_MAX_BYTES", 100)
    monkeypatch.setattr(cli, "SPEC_MAX_BYTES", 100)  # how much of the file the CLI reads
    path = tmp_path / "big.yaml"
    path.write_text("notes: " + "x" * 1000 + "\n")

    with pytest.raises(SpecError, match=rf"^--spec {path}: more than 100 characters"):
        load_spec_file(str(path))


@pytest.mark.parametrize("text", ["seed: 1" + "1" * 5000, "date: 2001-13-45", "x: !!float abc"])
def test_a_scalar_yaml_cannot_convert_is_a_spec_error(text):
    with pytest.raises(SpecError, match=r"^s: not valid YAML/JSON \(a value cannot be read"):
        load_yaml(text, "s")


def test_set_values_are_parsed_within_the_limits_and_bad_yaml_stays_a_string():
    data: dict = {}
    apply_override(data, "a=[1, 2]")
    apply_override(data, "b=2001-13-45")  # not YAML a scalar can become: kept as the text given

    assert data == {"a": [1, 2], "b": "2001-13-45"}
    with pytest.raises(SpecError, match=r"^--set 'c': nested deeper than 64"):
        apply_override(data, "c=" + "[" * 100 + "]" * 100)


def test_the_kfp_launcher_parses_its_spec_parameter_within_the_limits():
    with pytest.raises(SpecError, match=r"^spec: nested deeper than 64"):
        bind_spec('{"a": ' + "[" * 50_000 + "]" * 50_000 + "}", ref_fields=(), artifacts={}, uris={})
