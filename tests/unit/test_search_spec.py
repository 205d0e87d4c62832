"""Recipe search spec: candidate generation (grid, random, toggles, collapsing) and the errors that
name the field of a bad space."""

from __future__ import annotations

import pytest

from mnnpipe.errors import SpecError
from mnnpipe.search.spec import Range, apply_overrides, candidates, describe_overrides, parse_search

BASE = {
    "model": {"format": "torchscript"},
    "prune": {"target": {"ratio": 0.3}, "method": "l1"},
    "convert": {"fp16": False},
    "gate": {"metric": "top1"},
}


def spec(space, **kw):
    return parse_search({"base": BASE, "space": space, **kw})


def test_grid_is_the_product_in_space_order_with_stable_ids():
    s = spec({"prune.target.ratio": [0.2, 0.4, 0.6], "quantize.mode": ["int8", "fp16"]})
    cands = candidates(s)
    assert [c.id for c in cands] == [f"c{i:02d}" for i in range(6)]
    assert [c.overrides for c in cands][:3] == [
        {"prune.target.ratio": 0.2, "quantize.mode": "int8"},
        {"prune.target.ratio": 0.2, "quantize.mode": "fp16"},
        {"prune.target.ratio": 0.4, "quantize.mode": "int8"},
    ]
    assert cands[3].recipe["prune"] == {"target": {"ratio": 0.4}, "method": "l1"}
    assert cands[3].recipe["quantize"] == {"mode": "fp16"}  # intermediate mapping created
    assert BASE["prune"]["target"]["ratio"] == 0.3  # the base is never modified
    assert candidates(s) == cands


def test_range_values_are_inclusive_and_rounded():
    assert Range(low=0.1, high=0.7, step=0.2).values() == [0.1, 0.3, 0.5, 0.7]
    assert Range(low=0, high=1, step=0.1).values()[3] == 0.3
    assert Range(low=1, high=10, step=3).values() == [1, 4, 7, 10]
    assert all(isinstance(v, int) for v in Range(low=1, high=10, step=3).values())
    assert Range(low=2, high=2, step=1).values() == [2]
    cands = candidates(spec({"prune.target.ratio": {"low": 0.1, "high": 0.5, "step": 0.2}}))
    assert [c.overrides["prune.target.ratio"] for c in cands] == [0.1, 0.3, 0.5]


def test_grid_over_budget_names_budget_and_random_draws_budget_distinct_points():
    space = {"prune.target.ratio": {"low": 0.05, "high": 0.95, "step": 0.05}, "quantize.mode": ["int8", "fp16", "none"]}
    with pytest.raises(SpecError, match=r"^budget: the grid has 57 distinct candidates, more than budget 8"):
        spec(space, budget=8)
    drawn = candidates(spec(space, budget=8, sampling="random", seed=3))
    assert len(drawn) == 8
    assert len({tuple(sorted(c.overrides.items())) for c in drawn}) == 8
    assert candidates(spec(space, budget=8, sampling="random", seed=3)) == drawn  # seeded
    assert candidates(spec(space, budget=8, sampling="random", seed=4)) != drawn
    # kept in grid order, so ids read in the same order as a grid's
    grid = [c.overrides for c in candidates(spec(space, budget=57))]
    assert [grid.index(c.overrides) for c in drawn] == sorted(grid.index(c.overrides) for c in drawn)


def test_random_with_a_small_space_returns_all_of_it():
    assert len(candidates(spec({"quantize.mode": ["int8", "fp16"]}, budget=10, sampling="random"))) == 2


def test_step_toggle_removes_the_section_and_collapses_what_is_below_it():
    s = spec({"prune": [None, {"method": "l2"}], "prune.target.ratio": [0.2, 0.4]})
    cands = candidates(s)
    assert len(cands) == 3  # (off, 0.2) and (off, 0.4) are one recipe
    assert cands[0].overrides == {"prune": None}
    assert "prune" not in cands[0].recipe
    # the section is set first, then edited, whatever the order of the space
    assert cands[1].recipe["prune"] == {"method": "l2", "target": {"ratio": 0.2}}
    reordered = candidates(spec({"prune.target.ratio": [0.2, 0.4], "prune": [None, {"method": "l2"}]}))
    assert sorted(str(c.recipe) for c in reordered) == sorted(str(c.recipe) for c in cands)


def test_duplicate_recipes_are_collapsed():
    cands = candidates(spec({"prune.target.ratio": [0.3, 0.3, 0.5]}))
    assert [c.overrides for c in cands] == [{"prune.target.ratio": 0.3}, {"prune.target.ratio": 0.5}]
    # a toggle collapses before the budget check: 1 + 3 distinct recipes fit a budget of 4
    assert len(candidates(spec({"prune": [None, {"method": "l1"}], "prune.target.ratio": [0.1, 0.2, 0.3]}, budget=4))) == 4


@pytest.mark.parametrize(
    "space, expected",
    [
        ({"prune.target.ratio": []}, r"^space\.prune\.target\.ratio: empty list"),
        ({"prune..ratio": [0.1]}, r"^space\.prune\.\.ratio: not a dotted path"),
        ({"prune.target.ratio": 0.5}, r"^space\.prune\.target\.ratio: expected a non-empty list of values or a range"),
        ({"prune.target.ratio": {"low": 0.5, "high": 0.1, "step": 0.1}}, r"^space\.prune\.target\.ratio: bad range .*high \(0\.1\) must be >= low"),
        ({"prune.target.ratio": {"low": 0.1, "high": 0.5, "step": 0}}, r"^space\.prune\.target\.ratio: bad range .*step: Input should be greater than 0"),
        ({"prune.target.ratio": {"low": 0.1, "high": 0.5}}, r"^space\.prune\.target\.ratio: bad range .*step: required field is missing"),
        ({"prune.target.ratio": {"low": 0, "high": 1, "count": 3, "step": 1}}, r"^space\.prune\.target\.ratio: bad range .*count: unknown field"),
        ({"prune.target.ratio.x": [1]}, r"^space\.prune\.target\.ratio\.x: cannot set a field inside prune\.target\.ratio, which is a float"),
        ({"prune.target.ratio": [float("nan")]}, r"^space\.prune\.target\.ratio: value nan is not a JSON value"),
        ({}, r"^space: name at least one path"),
    ],
)
def test_bad_space_names_the_field(space, expected):
    with pytest.raises(SpecError, match=expected):
        spec(space)


def test_other_bad_fields_are_named():
    with pytest.raises(SpecError, match=r"^objective\.weights: required when kind is 'weighted'"):
        spec({"quantize.mode": ["int8"]}, objective={"kind": "weighted"})
    with pytest.raises(SpecError, match=r"^objective\.weights: at least one weight must be > 0"):
        spec({"quantize.mode": ["int8"]}, objective={"kind": "weighted", "weights": {"size": 0}})
    with pytest.raises(SpecError, match=r"^objective\.weights: only used when kind is 'weighted'"):
        spec({"quantize.mode": ["int8"]}, objective={"kind": "fastest", "weights": {"size": 1}})
    with pytest.raises(SpecError, match=r"^constraints\.min_fidelity: Input should be less than or equal to 1"):
        spec({"quantize.mode": ["int8"]}, constraints={"min_fidelity": 1.5})
    with pytest.raises(SpecError, match=r"^base: Input should be a valid dictionary"):
        parse_search({"base": ["convert"], "space": {"quantize.mode": ["int8"]}})
    with pytest.raises(SpecError, match=r"^budget: Input should be greater than or equal to 1"):
        spec({"quantize.mode": ["int8"]}, budget=0)


def test_yaml_text_is_accepted():
    s = parse_search("base: {convert: {}}\nspace:\n  quantize.mode: [int8, fp16]\nsampling: grid\n")
    assert [c.recipe for c in candidates(s)] == [{"convert": {}, "quantize": {"mode": "int8"}}, {"convert": {}, "quantize": {"mode": "fp16"}}]


def test_validate_hook_error_names_the_candidate_and_its_overrides():
    seen = []

    def validate(recipe):
        seen.append(recipe)
        ratio = recipe["prune"]["target"]["ratio"]
        if ratio >= 1:
            raise SpecError("recipe.prune.target.ratio: Input should be less than 1")

    s = spec({"prune.target.ratio": [0.5, 1.0]})
    with pytest.raises(SpecError) as e:
        candidates(s, validate=validate)
    assert str(e.value) == (
        "space: candidate c01 (prune.target.ratio=1.0) is invalid: recipe.prune.target.ratio: Input should be less than 1"
    )
    assert e.value.exit_code == 2
    seen[0]["prune"]["target"]["ratio"] = 99  # the hook gets a copy
    assert candidates(spec({"prune.target.ratio": [0.5]}), validate=validate)[0].recipe["prune"]["target"]["ratio"] == 0.5


def test_paths_are_checked_by_the_recipe_hook_not_by_a_list_of_sections():
    # a top-level scalar of the recipe (e.g. `compare`) is a path like any other
    cands = candidates(spec({"compare": ["source", "every-step"]}))
    assert [c.recipe["compare"] for c in cands] == ["source", "every-step"]

    def validate(recipe):
        unknown = sorted(set(recipe) - {"model", "compare", "prune", "convert", "quantize", "gate"})
        if unknown:
            raise SpecError(f"recipe.{unknown[0]}: unknown field")

    with pytest.raises(SpecError, match=r"^space: candidate c00 \(prnue\.target\.ratio=0\.1\) is invalid: recipe\.prnue: unknown field$"):
        candidates(spec({"prnue.target.ratio": [0.1]}), validate=validate)


def test_apply_overrides_sets_deep_paths_and_drops_null_sections():
    out = apply_overrides({"convert": {"a": 1}, "prune": None}, {"distill.student.width": 0.5, "convert.a": 2})
    assert out == {"convert": {"a": 2}, "distill": {"student": {"width": 0.5}}}


def test_describe_overrides_reads_a_section_as_on_and_null_as_off():
    section = {"mode": "full-int8", "calibration": {"format": "sklearn-digits", "split": "train"}, "calibration_samples": 200}
    assert describe_overrides({"prune.target.ratio": 0.2, "quantize": section}) == "prune.target.ratio=0.2, quantize=on"
    assert describe_overrides({"prune.target.ratio": 0.2, "quantize": None}) == "prune.target.ratio=0.2, quantize=off"
    # scalars and lists stay JSON, so a string is told from a number
    assert describe_overrides({"quantize.mode": "int8", "convert.fp16": True, "inputs.shape": [1, 3]}) == (
        'quantize.mode="int8", convert.fp16=true, inputs.shape=[1, 3]'
    )
    assert describe_overrides({}) == "the base recipe"


def test_validate_hook_error_names_a_section_override_briefly():
    def validate(recipe):
        raise SpecError("recipe.prune.method: bad")

    with pytest.raises(SpecError, match=r"^space: candidate c00 \(prune=on\) is invalid: recipe\.prune\.method: bad$"):
        candidates(spec({"prune": [{"method": "l9", "target": {"ratio": 0.5}}]}), validate=validate)
