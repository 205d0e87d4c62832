"""The release gate is a step: `mnnpipe run gate`, the runner's lock and manifest, a budget in
percentage points, and `latest.json` moved only once the release's manifest exists."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mnnpipe.errors import StepFailed
from mnnpipe.release import read_latest
from mnnpipe.runner import run_step
from mnnpipe.store import MANIFEST, sha256_file

pytestmark = pytest.mark.integration


@pytest.fixture
def candidate(tmp_path) -> Path:
    path = tmp_path / "quantize" / "model.mnn"
    path.parent.mkdir()
    path.write_bytes(b"not really an mnn model, the gate only copies it")
    return path


def gate_spec(candidate: Path, output: str, int8_top1: float) -> dict:
    return {
        "candidate": {"uri": str(candidate)},
        "candidate_metrics": {"mnn-int8/top1": int8_top1, "mnn-fp32/top1": 0.95},
        "metric": "mnn-int8/top1",
        "reference_metric": "mnn-fp32/top1",
        "max_drop": 1.0,  # percentage points, like quantize's max_accuracy_drop
        "output": output,
    }


def test_gate_within_budget_publishes_the_release_then_moves_latest(candidate, tmp_path, cache_dir):
    root = tmp_path / "released"
    release = root / "digits" / "3" / "recipe1"

    result = run_step("gate", {**gate_spec(candidate, str(release), 0.945), "move_latest": True})

    manifest = json.loads((release / MANIFEST).read_text())
    assert manifest["step"] == "gate" and manifest["result"]["drop"] == pytest.approx(0.5)
    assert manifest["artifacts"]["model.mnn"]["sha256"] == sha256_file(candidate)
    assert result.latest_moved is True
    latest = read_latest(str(root), "digits")
    assert latest["version"] == "3" and latest["release"] == str(release)
    # latest names the manifest that existed when it moved: the release was complete first
    assert latest["manifest_sha256"] == hashlib.sha256((release / MANIFEST).read_bytes()).hexdigest()

    # Same bytes and metrics for the next version: released there (not served from version 3's
    # cache, whose result names version 3), and latest moves on.
    newer = root / "digits" / "4" / "recipe1"
    again = run_step("gate", {**gate_spec(candidate, str(newer), 0.945), "move_latest": True})
    assert again.cached is False and again.released == str(newer) and again.latest_moved is True
    assert read_latest(str(root), "digits")["release"] == str(newer)
    assert json.loads((newer / "result.json").read_text())["released"] == str(newer)


def test_gate_over_budget_fails_and_releases_nothing(candidate, tmp_path, cache_dir):
    root = tmp_path / "released"
    release = root / "digits" / "3" / "recipe1"

    with pytest.raises(StepFailed, match="1.5 points worse"):
        run_step("gate", {**gate_spec(candidate, str(release), 0.935), "move_latest": True})

    assert not (release / MANIFEST).exists()
    assert read_latest(str(root), "digits") is None


def test_mnnpipe_run_gate_on_the_command_line(candidate, tmp_path, cache_dir):
    spec = tmp_path / "gate.json"
    env = {**os.environ, "MNNPIPE_CACHE_URI": str(cache_dir)}
    cmd = [sys.executable, "-m", "mnnpipe.cli", "-q", "run", "gate", "--spec", str(spec)]

    spec.write_text(json.dumps(gate_spec(candidate, str(tmp_path / "over"), 0.90)))
    over = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert over.returncode == 1 and "not released" in over.stderr

    spec.write_text(json.dumps(gate_spec(candidate, str(tmp_path / "ok"), 0.95)))
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["released"] == str(tmp_path / "ok")
    assert json.loads(ok.stdout)["latest_moved"] is False  # no move_latest: no pointer anywhere
    assert not (tmp_path.parent / "latest.json").exists()  # where <root>/<name>/<version>/<digest> would put it

    spec.write_text(json.dumps({**gate_spec(candidate, "s3://bucket/3/recipe1", 0.95), "move_latest": True}))
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "move_latest" in bad.stderr  # not <root>/<name>/<version>/<digest>
