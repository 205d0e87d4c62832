"""The release gate as the Airflow DAGs run it: the recipe's release step, fed from the planned
steps' Results in XCom (the plan says which step's hand-off is the candidate and whose metrics
judge it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mnnpipe.airflow.release import gate_and_release
from mnnpipe.default_recipe import COMPRESS_RECIPE
from mnnpipe.errors import StepFailed
from mnnpipe.recipe import plan
from mnnpipe.release import read_latest


def _results(tmp_path: Path, candidate_top1: float, fp32_accuracy: float = 0.95) -> dict[str, dict]:
    """What quantize and benchmark pushed to XCom (only the fields the release reads)."""
    model = tmp_path / "quantize" / "model.mnn"
    model.parent.mkdir(parents=True, exist_ok=True)
    model.write_bytes(b"int8 model bytes")
    return {
        "quantize": {"artifacts": {"model.mnn": {"uri": str(model)}}, "metrics": {"fp32_accuracy": fp32_accuracy, "accuracy": candidate_top1}},
        "benchmark": {"metrics": {"source/top1": fp32_accuracy, "candidate/top1": candidate_top1, "candidate/size_bytes": 16.0}},
    }


def test_within_budget_the_version_is_released_and_latest_moves(tmp_path: Path) -> None:
    root = str(tmp_path / "released")
    recipe_plan = plan(COMPRESS_RECIPE)
    assert (recipe_plan.release.candidate_from, recipe_plan.release.metrics_from, recipe_plan.release.reference_from) == ("quantize", "benchmark", "quantize")

    result = gate_and_release(
        recipe_plan.release,
        found={"version": "v3", "name": "digits", "model_uri": "x"},
        results=_results(tmp_path, candidate_top1=0.945),  # 0.5 points below fp32
        release_root=root,
        digest=recipe_plan.digest,
    )

    release = tmp_path / "released" / "digits" / "v3" / recipe_plan.digest
    assert result["released"] == str(release)
    assert result["latest_moved"] is True
    assert (release / "model.mnn").read_bytes() == b"int8 model bytes"
    manifest = json.loads((release / "manifest.json").read_text())
    assert manifest["step"] == "gate"
    # the plan's release spec, with the metrics wired from the steps the plan names
    assert manifest["spec"]["recipe_digest"] == recipe_plan.digest
    assert manifest["spec"]["metric"] == COMPRESS_RECIPE["gate"]["metric"] == "candidate/top1"
    assert manifest["spec"]["candidate_metrics"]["candidate/top1"] == 0.945
    assert manifest["spec"]["reference_metrics"]["fp32_accuracy"] == 0.95
    assert read_latest(root, "digits")["version"] == "v3"


def test_over_budget_nothing_is_released(tmp_path: Path) -> None:
    root = tmp_path / "released"
    recipe_plan = plan(COMPRESS_RECIPE)

    with pytest.raises(StepFailed, match=r"not released: candidate/top1 0\.93 is 2 points worse than fp32_accuracy"):
        gate_and_release(
            recipe_plan.release, found={"version": "v3", "name": "digits"}, results=_results(tmp_path, candidate_top1=0.93), release_root=str(root), digest="d" * 16
        )
    assert not [p for p in root.rglob("*") if p.is_file()]  # the output lock leaves empty folders at most


def test_the_budget_and_the_digest_are_the_recipes(tmp_path: Path) -> None:
    looser = {**COMPRESS_RECIPE, "gate": {**COMPRESS_RECIPE["gate"], "max_drop": 2.5}}
    assert plan(looser).release.spec["max_drop"] == 2.5  # percentage points, like quantize's max_accuracy_drop
    assert plan(looser).digest != plan(COMPRESS_RECIPE).digest  # a changed recipe releases anew

    # 2 points down: over the default budget, within the looser one
    result = gate_and_release(
        plan(looser).release, found={"version": "v4", "name": "digits"}, results=_results(tmp_path, candidate_top1=0.93), release_root=str(tmp_path / "r"), digest=plan(looser).digest
    )
    assert result["drop"] == pytest.approx(2.0)


def test_without_a_measuring_step_the_candidate_step_judges_itself(tmp_path: Path) -> None:
    """No benchmark: quantize's own metrics are both the candidate's and the reference's."""
    recipe = {k: v for k, v in COMPRESS_RECIPE.items() if k != "benchmark"}
    recipe["gate"] = {"metric": "accuracy", "reference_metric": "fp32_accuracy", "max_drop": 1.0}
    recipe_plan = plan(recipe)
    assert (recipe_plan.release.candidate_from, recipe_plan.release.metrics_from, recipe_plan.release.reference_from) == ("quantize", "quantize", None)

    result = gate_and_release(
        recipe_plan.release, found={"version": "v5"}, results=_results(tmp_path, candidate_top1=0.945), release_root=str(tmp_path / "r"), digest=recipe_plan.digest
    )

    assert result["released"] == str(tmp_path / "r" / "model" / "v5" / recipe_plan.digest)  # no name: "model"
    assert result["value"] == 0.945 and result["reference"] == 0.95
