"""The release trend: ordering, regressions beyond (and not within) tolerance, the JSON series, the
HTML page, and reading releases back from a release root laid out as the gate publishes it."""

from __future__ import annotations

import base64
import json
import logging
import re

import pytest

from mnnpipe.search.trend import Release, TrendTolerance, collect_releases, render_trend_html, trend, trend_json


def rel(version, at, size, p50=None, acc=None, digest="d" * 16):
    return Release(version=version, released_at=at, recipe_digest=digest, size_bytes=size, latency_ms_p50=p50, accuracy=acc)


TOL = TrendTolerance(accuracy_pp=0.5, size_ratio=1.05, latency_ratio=1.10)


def test_series_is_ordered_by_time_then_version():
    same = "2026-01-02T00:00:00+00:00"
    t = trend([rel("v10", same, 1), rel("v2", "2026-01-01T00:00:00Z", 1), rel("v9", same, 1)], TOL)
    assert [p.version for p in t.points] == ["v2", "v9", "v10"]  # natural version order on equal times
    # zones are compared as instants: 01:30+02:00 is before 00:00 UTC
    t = trend([rel("a", "2026-01-02T00:00:00+00:00", 1), rel("b", "2026-01-02T01:30:00+02:00", 1)], TOL)
    assert [p.version for p in t.points] == ["b", "a"]


def test_regressions_beyond_tolerance_are_flagged_against_the_previous_release():
    series = [
        rel("v1", "2026-01-01T00:00:00Z", 100_000, 1.00, 0.970),
        rel("v2", "2026-01-02T00:00:00Z", 104_000, 1.09, 0.966),  # +4%, +9%, -0.4 pp: within
        rel("v3", "2026-01-03T00:00:00Z", 110_000, 1.09, 0.966),  # +5.8% size
        rel("v4", "2026-01-04T00:00:00Z", 110_000, 1.30, 0.950),  # +19% p50, -1.6 pp
        rel("v5", "2026-01-05T00:00:00Z", 90_000, 1.30, 0.951),  # better than v4 (not compared to v1)
    ]
    t = trend(series, TOL)
    assert [p.regression for p in t.points] == [False, False, True, True, False]
    assert t.points[2].reasons == ["size 110,000 B is +5.8% over v2's 104,000 B (tolerance +5%)"]
    assert t.points[2].regressed == ["size"]
    assert t.points[3].reasons == [
        "accuracy 95.00% is 1.60 pp below v3 (tolerance 0.5 pp)",
        "p50 1.3 ms is +19.3% over v3's 1.09 ms (tolerance +10%)",
    ]
    assert t.points[3].regressed == ["accuracy", "latency"]


def test_a_version_released_with_two_recipes_is_told_apart_by_digest_and_not_judged_against_itself():
    t = trend(
        [
            rel("v1", "2026-01-01T00:00:00Z", 100, digest="a" * 16),
            rel("v1", "2026-01-02T00:00:00Z", 200, digest="b" * 16),  # a rerun / another recipe of v1
            rel("v2", "2026-01-03T00:00:00Z", 300, digest="a" * 16),
        ],
        TOL,
    )
    assert [p.regression for p in t.points] == [False, False, True]
    assert t.points[2].reasons == ["size 300 B is +50.0% over v1 (bbbbbbbb)'s 200 B (tolerance +5%)"]


def test_exactly_at_tolerance_and_missing_metrics_are_not_regressions():
    t = trend(
        [
            rel("v1", "2026-01-01T00:00:00Z", 100_000, 1.0, 0.970),
            rel("v2", "2026-01-02T00:00:00Z", 105_000, 1.1, 0.965),  # exactly at every tolerance
            rel("v3", "2026-01-03T00:00:00Z", 105_000, None, None),  # nothing to compare
            rel("v4", "2026-01-04T00:00:00Z", 105_000, 9.9, 0.100),  # v3 measured neither
        ],
        TOL,
    )
    assert [p.regression for p in t.points] == [False, False, False, False]
    strict = trend([rel("v1", "2026-01-01T00:00:00Z", 100), rel("v2", "2026-01-02T00:00:00Z", 101)], TrendTolerance(size_ratio=1.0))
    assert strict.points[1].regression


def test_trend_json_and_html():
    t = trend([rel("v1", "2026-01-01T00:00:00Z", 100, 1.0, 0.9), rel("v2", "2026-01-02T00:00:00Z", 200, 1.0, 0.9)], TOL)
    doc = json.loads(json.dumps(trend_json(t)))
    assert doc["regressions"] == ["v2"]
    assert [p["version"] for p in doc["series"]] == ["v1", "v2"]
    assert doc["series"][1]["reasons"][0].startswith("size 200 B is +100.0%")
    assert doc["tolerance"] == TOL.model_dump()
    page = render_trend_html(t, "digits")
    assert "<title>digits: release trend</title>" in page and "<td>v1</td>" in page and "<td>v2</td>" in page
    assert "size 200 B is +100.0%" in page
    png = base64.b64decode(re.search(r"src='data:image/png;base64,([^']+)'", page).group(1))
    assert png.startswith(b"\x89PNG")
    assert "<img" not in render_trend_html(trend([], TOL), "empty")


def test_released_at_must_be_iso():
    with pytest.raises(ValueError, match="not an ISO 8601 time"):
        rel("v1", "yesterday", 1)


# --------------------------------------------------------------------------- reading releases


def write_release(root, name, version, digest, *, size, value, finished_at, metrics=None, candidate_metrics=None, higher_is_better=True):
    """A release folder as the gate publishes it: the model file, result.json, manifest.json."""
    prefix = root / name / version / digest
    prefix.mkdir(parents=True)
    (prefix / "model.mnn").write_bytes(b"\0" * size)
    result = {
        "schema_version": 1, "kind": "gate", "output": str(prefix), "cached": False, "cache_key": "k",
        "artifacts": {"model.mnn": {"uri": f"{prefix}/model.mnn", "sha256": "0" * 64, "size": size, "media_type": "application/octet-stream"}},
        "metrics": {"value": value, "reference": 0.97, "drop": (0.97 - value) * 100, **(metrics or {})},
        "metric": "top1", "value": value, "reference": 0.97, "drop": (0.97 - value) * 100,
        "released": str(prefix), "source": f"s3://runs/{version}/quantize/model.mnn", "latest_moved": True,
    }
    manifest = {
        "schema_version": 1, "step": "gate",
        "spec": {"kind": "gate", "metric": "top1", "recipe_digest": digest, "higher_is_better": higher_is_better,
                 "candidate_metrics": candidate_metrics or {}},
        "inputs": {}, "artifacts": result["artifacts"], "result": result, "metrics": result["metrics"],
        "cache_key": "k", "cached_from": None, "started_at": finished_at, "finished_at": finished_at,
    }
    (prefix / "result.json").write_text(json.dumps(result))
    (prefix / "manifest.json").write_text(json.dumps(manifest))
    return prefix


def test_collect_releases_reads_the_release_layout(tmp_path, caplog):
    root = tmp_path / "released"
    write_release(root, "digits", "v1", "a" * 16, size=1000, value=0.965, finished_at="2026-01-01T00:00:00+00:00",
                  candidate_metrics={"candidate/t1_b1/p50_ms": 0.5, "candidate/top1": 0.965})
    write_release(root, "digits", "v2", "b" * 16, size=1200, value=0.95, finished_at="2026-02-01T00:00:00+00:00",
                  metrics={"latency_ms_p50": 0.7, "accuracy": 0.951})
    write_release(root, "digits", "v3", "c" * 16, size=900, value=0.04, finished_at="2026-03-01T00:00:00+00:00",
                  higher_is_better=False)  # an error rate: not an accuracy
    write_release(root, "other", "v1", "d" * 16, size=5, value=0.9, finished_at="2026-01-01T00:00:00+00:00")
    (root / "digits" / "latest.json").write_text("{}")
    unpublished = root / "digits" / "v4" / ("e" * 16)
    unpublished.mkdir(parents=True)
    (unpublished / "model.mnn").write_bytes(b"half")  # no manifest: not (yet) a release
    broken = root / "digits" / "v5" / ("f" * 16)
    broken.mkdir(parents=True)
    (broken / "manifest.json").write_text("{not json")
    partial = root / "digits" / "v6" / ("0" * 16)
    partial.mkdir(parents=True)
    (partial / "manifest.json").write_text(json.dumps({"step": "gate", "finished_at": "2026-04-01T00:00:00Z"}))

    with caplog.at_level(logging.WARNING, logger="mnnpipe.search.trend"):
        found = collect_releases(f"file://{root}", "digits")
    by_version = {r.version: r for r in found}
    assert sorted(by_version) == ["v1", "v2", "v3"]
    assert by_version["v1"] == Release(version="v1", released_at="2026-01-01T00:00:00+00:00", recipe_digest="a" * 16,
                                       size_bytes=1000, latency_ms_p50=0.5, accuracy=0.965)
    assert (by_version["v2"].latency_ms_p50, by_version["v2"].accuracy) == (0.7, 0.951)  # result.metrics first
    assert by_version["v3"].accuracy is None and by_version["v3"].size_bytes == 900
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "v5" in warned and "v6" in warned and "skipped" in warned and "v4" not in warned
    assert [p.version for p in trend(found, TOL).points] == ["v1", "v2", "v3"]
    assert trend(found, TOL).points[1].regression  # +20% size, -1.4 pp
    assert collect_releases(str(root), "absent") == []
