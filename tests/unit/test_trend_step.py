"""The trend step through run_step, over releases the real gate step published.

Each release is a gate run (fast: it copies one fake .mnn) with output
`<release_root>/<name>/<version>/<digest>` and move_latest, exactly as a recipe releases: its
manifest records the file's size, the gate's value (top-1) and the benchmark's p50 among the
candidate metrics, which is what the trend reads back.
"""

from __future__ import annotations

import json

import pytest

from mnnpipe.errors import InputError, StepFailed
from mnnpipe.runner import run_step


def release(root, version: str, size: int, top1: float, p50: float, name: str = "digits", digest: str = "0123456789abcdef"):
    """Publish one release of `name` through the gate, as a recipe's last step does."""
    src = root.parent / "candidates" / version
    src.mkdir(parents=True, exist_ok=True)
    model = src / "model.mnn"
    model.write_bytes((version.encode() * size)[:size])
    return run_step(
        "gate",
        {
            "candidate": {"uri": str(model)},
            "candidate_metrics": {"candidate/top1": top1, "candidate/t1_b1/p50_ms": p50, "source/top1": 0.98},
            "metric": "candidate/top1",
            "min_value": 0.5,
            "recipe_digest": digest,
            "move_latest": True,
            "output": f"{root}/{name}/{version}/{digest}",
        },
        quiet=True,
    )


@pytest.fixture
def root(tmp_path):
    return tmp_path / "released"


def trend(root, out, **kw):
    return run_step("trend", {"release_root": str(root), "name": "digits", "output": str(out), **kw}, quiet=True)


def test_the_release_layout_is_what_the_gate_publishes(root, cache_dir):
    release(root, "1.0.0", 40_000, 0.97, 0.20)
    assert (root / "digits" / "1.0.0" / "0123456789abcdef" / "manifest.json").exists()
    assert json.loads((root / "digits" / "latest.json").read_text())  # skipped by the trend, not a release


def test_a_worse_newest_release_is_flagged_with_its_reasons(root, tmp_path, cache_dir):
    release(root, "1.0.0", 40_000, 0.970, 0.20)
    release(root, "1.1.0", 39_000, 0.972, 0.19)
    release(root, "1.2.0", 48_000, 0.950, 0.30)  # +23% size, -2.2 pp, +58% latency over 1.1.0
    out = tmp_path / "out"

    result = trend(root, out)

    assert result.releases == 3 and result.newest == "1.2.0"
    assert result.regression is True and result.regressed_versions == ["1.2.0"]
    assert len(result.reasons) == 3
    accuracy, size, latency = result.reasons
    assert accuracy == "accuracy 95.00% is 2.20 pp below 1.1.0 (tolerance 0.5 pp)"
    assert size == "size 48,000 B is +23.1% over 1.1.0's 39,000 B (tolerance +5%)"
    assert latency.startswith("p50 0.3 ms is +57.9% over 1.1.0's 0.19 ms")
    assert result.metrics["regression"] == 1.0 and result.metrics["releases"] == 3.0
    assert result.metrics["newest/size_bytes"] == 48_000 and result.metrics["newest/accuracy"] == 0.95
    assert result.metrics["newest/latency_ms_p50"] == 0.30
    doc = json.loads((out / "trend.json").read_text())
    assert doc["regressions"] == ["1.2.0"]
    assert [p["version"] for p in doc["series"]] == ["1.0.0", "1.1.0", "1.2.0"]
    assert [p["size_bytes"] for p in doc["series"]] == [40_000, 39_000, 48_000]  # the released file's bytes
    assert doc["series"][2]["regressed"] == ["accuracy", "size", "latency"]
    page = (out / "trend.html").read_text()
    assert "digits: release trend" in page and "data:image/png;base64," in page and "2.20 pp below 1.1.0" in page
    assert (out / "manifest.json").exists()


def test_only_the_metric_beyond_tolerance_is_named(root, tmp_path, cache_dir):
    release(root, "1.0.0", 40_000, 0.970, 0.20)
    release(root, "2.0.0", 40_500, 0.968, 0.30)  # latency +50%, the rest within tolerance

    result = trend(root, tmp_path / "out", tolerance={"latency_ratio": 1.2})

    assert result.regression is True and len(result.reasons) == 1
    assert result.reasons[0].startswith("p50 0.3 ms is +50.0% over 1.0.0's 0.2 ms (tolerance +20%)")


def test_a_newest_release_within_tolerance_is_not_flagged(root, tmp_path, cache_dir):
    release(root, "1.0.0", 40_000, 0.970, 0.20)
    release(root, "1.1.0", 41_000, 0.966, 0.21)  # -0.4 pp, +2.5% size, +5% latency: all within the defaults

    result = trend(root, tmp_path / "out", fail_on_regression=True)

    assert result.regression is False and result.reasons == [] and result.regressed_versions == []
    assert result.metrics["regression"] == 0.0
    assert json.loads((tmp_path / "out" / "trend.json").read_text())["regressions"] == []


def test_an_older_regression_is_listed_but_does_not_flag_the_newest(root, tmp_path, cache_dir):
    release(root, "1.0.0", 40_000, 0.970, 0.20)
    release(root, "1.1.0", 40_000, 0.940, 0.20)  # regressed, then recovered
    release(root, "1.2.0", 40_000, 0.970, 0.20)

    result = trend(root, tmp_path / "out", fail_on_regression=True)

    assert result.regression is False and result.regressed_versions == ["1.1.0"]


def test_fail_on_regression_fails_and_publishes_nothing(root, tmp_path, cache_dir):
    release(root, "1.0.0", 40_000, 0.970, 0.20)
    release(root, "1.1.0", 40_000, 0.950, 0.20)
    out = tmp_path / "out"

    with pytest.raises(StepFailed) as e:
        trend(root, out, fail_on_regression=True)

    assert str(e.value) == "trend: release 1.1.0 regressed: accuracy 95.00% is 2.00 pp below 1.0.0 (tolerance 0.5 pp)"
    assert e.value.exit_code == 1
    assert not (out / "manifest.json").exists() and not (out / "trend.json").exists()


@pytest.mark.parametrize("other", [False, True])
def test_no_release_is_an_input_error_naming_release_root(root, tmp_path, cache_dir, other):
    if other:  # another model's releases are not this one's
        release(root, "1.0.0", 40_000, 0.97, 0.20, name="other")
    else:
        root.mkdir()
    out = tmp_path / "out"

    with pytest.raises(InputError) as e:
        trend(root, out)

    assert str(e.value).startswith(f"release_root: no release of 'digits' under {root}")
    assert e.value.exit_code == 2
    assert not (out / "manifest.json").exists()


def test_a_folder_without_a_gate_manifest_is_skipped(root, tmp_path, cache_dir, caplog):
    release(root, "1.0.0", 40_000, 0.970, 0.20)
    broken = root / "digits" / "1.1.0" / "feedface"
    broken.mkdir(parents=True)
    (broken / "manifest.json").write_text("{not json")

    result = trend(root, tmp_path / "out")

    assert result.releases == 1 and result.newest == "1.0.0"
    assert "skipped, not a readable release manifest" in caplog.text
