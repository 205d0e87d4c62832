"""Model versions: names checked where they are published, skipped folders logged, and which
versions a recompression run takes (its Asset events' versions, else a sweep of the registry)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from mnnpipe.airflow.handoff import versions_to_compress
from mnnpipe.errors import SpecError
from mnnpipe.registry import check_version, list_versions, unprocessed_versions


def _publish(root: Path, version: str, name: str = "model.pt") -> str:
    path = root / version / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"model")
    return str(path)


def _event(**extra):
    return SimpleNamespace(extra=extra)


def test_a_run_id_is_refused_as_a_version_name_where_it_is_published() -> None:
    assert check_version("20261130T040506") == "20261130T040506"
    with pytest.raises(SpecError, match=r"model version 'manual__2026-11-30T04:05:06\+00:00': not a valid version name \(expected"):
        check_version("manual__2026-11-30T04:05:06+00:00")
    with pytest.raises(SpecError, match="not a valid version name"):
        check_version("")


def test_the_registry_logs_every_folder_it_skips_and_why(tmp_path: Path, caplog) -> None:
    registry = tmp_path / "models"
    _publish(registry, "v1")
    _publish(registry, "manual__2026-11-30T04:05:06+00:00")
    _publish(registry, "v2", name="notes.txt")
    _publish(registry, "v2", name="extra.txt")  # two stray files: still one line for the folder
    _publish(registry / "v3", "nested")

    with caplog.at_level(logging.WARNING, logger="mnnpipe.registry"):
        found = list_versions(str(registry), "model.pt")

    assert [v.version for v in found] == ["v1"]
    skipped = [r.getMessage() for r in caplog.records]
    assert len(skipped) == 3, skipped
    assert any("'manual__2026-11-30T04:05:06+00:00': not a valid version name" in m for m in skipped)
    assert any("'v2': holds no model.pt directly inside it" in m for m in skipped)
    assert any("'v3': holds no model.pt directly inside it" in m for m in skipped)


def test_a_triggered_run_takes_the_versions_its_events_name(tmp_path: Path, caplog) -> None:
    registry, artifacts = tmp_path / "models", tmp_path / "artifacts"
    marker = str(artifacts / "{version}" / "done.json")
    v7 = _publish(registry, "v7")
    v8 = _publish(registry, "v8")
    _publish(registry, "v9")  # in the registry, but no event names it: not this run's business
    _publish(artifacts, "v8", name="done.json")  # v8 was compressed already

    with caplog.at_level(logging.WARNING, logger="mnnpipe.airflow.handoff"):
        picked = versions_to_compress(
            events=[_event(version="v8", model_uri=v8), _event(version="v7", model_uri=v7), _event(version="bad/name", model_uri=v7), _event()],
            registry=str(registry),
            processed_marker=marker,
        )

    assert picked == [{"version": "v7", "model_uri": v7, "name": "models"}]
    assert sum("ignored an asset event" in r.getMessage() for r in caplog.records) == 2


def test_a_scheduled_run_sweeps_every_unprocessed_version(tmp_path: Path) -> None:
    registry, artifacts = tmp_path / "models", tmp_path / "artifacts"
    marker = str(artifacts / "{version}" / "done.json")
    for version in ("v1", "v2", "v10"):
        _publish(registry, version)
    _publish(artifacts, "v2", name="done.json")

    picked = versions_to_compress(events=[], registry=str(registry), processed_marker=marker)

    assert [v["version"] for v in picked] == ["v1", "v10"]  # oldest first, the processed one left out
    assert [v.version for v in unprocessed_versions(str(registry), "model.pt", marker)] == ["v1", "v10"]
