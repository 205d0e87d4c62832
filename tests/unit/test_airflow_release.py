"""The release gate as the Airflow DAGs run it: the gate step, fed from the steps' Results in XCom."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mnnpipe.airflow.release import gate_and_release, gate_spec, recipe_digest
from mnnpipe.errors import StepFailed
from mnnpipe.release import read_latest


def _results(tmp_path: Path, int8_top1: float, fp32_top1: float = 0.95) -> tuple[dict, dict]:
    model = tmp_path / "quantize" / "model.mnn"
    model.parent.mkdir(parents=True, exist_ok=True)
    model.write_bytes(b"int8 model bytes")
    quantized = {"artifacts": {"model.mnn": {"uri": str(model)}}}
    benchmarked = {"metrics": {"mnn-fp32/top1": fp32_top1, "mnn-int8/top1": int8_top1, "mnn-int8/size_bytes": 16.0}}
    return quantized, benchmarked


def test_within_budget_the_version_is_released_and_latest_moves(tmp_path: Path) -> None:
    root = str(tmp_path / "released")
    digest = recipe_digest({"max_drop": 1.0})
    quantized, benchmarked = _results(tmp_path, int8_top1=0.945)  # 0.5 points below fp32

    result = gate_and_release(
        found={"version": "v3", "name": "digits", "model_uri": "x"}, quantized=quantized, benchmarked=benchmarked, release_root=root, gate=gate_spec(1.0, digest)
    )

    release = tmp_path / "released" / "digits" / "v3" / digest
    assert result["released"] == str(release)
    assert result["latest_moved"] is True
    assert (release / "model.mnn").read_bytes() == b"int8 model bytes"
    assert json.loads((release / "manifest.json").read_text())["step"] == "gate"
    assert read_latest(root, "digits")["version"] == "v3"


def test_over_budget_nothing_is_released(tmp_path: Path) -> None:
    root = tmp_path / "released"
    quantized, benchmarked = _results(tmp_path, int8_top1=0.93)  # 2 points below fp32, budget 1 point

    with pytest.raises(StepFailed, match=r"not released: mnn-int8/top1 0\.93 is 2 points worse than mnn-fp32/top1"):
        gate_and_release(
            found={"version": "v3", "name": "digits"}, quantized=quantized, benchmarked=benchmarked, release_root=str(root), gate=gate_spec(1.0, "d" * 16)
        )
    assert not [p for p in root.rglob("*") if p.is_file()]  # the output lock leaves empty folders at most


def test_the_budget_is_in_percentage_points_like_quantize() -> None:
    assert gate_spec(1.0, "d")["max_drop"] == 1.0  # the gate step takes percentage points too
    assert recipe_digest({"a": 1}) != recipe_digest({"a": 2})
