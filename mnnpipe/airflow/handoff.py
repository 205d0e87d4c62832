"""Which model versions a recompression run takes: the ones its Asset events name, else a sweep.

A training pipeline announces a version with the Asset event extra {"version", "model_uri"}
(dags/example_training_handoff.py). A run triggered by such events compresses exactly those
versions, without listing the registry; a scheduled or manual run sweeps the registry for every
version that is not processed yet. No Airflow import here: the DAG passes the events in.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import PurePosixPath
from typing import Any

from ..errors import SpecError
from ..registry import ModelVersion, check_version, marker_uri, unprocessed_versions, version_key
from ..specs import check_uri
from ..store import store_for

log = logging.getLogger(__name__)


def version_from_event(extra: Any) -> ModelVersion:
    """The version an event's extra names; SpecError saying what is wrong with it otherwise."""
    if not isinstance(extra, dict) or not extra.get("version") or not extra.get("model_uri"):
        raise SpecError(f"asset event extra: expected {{'version': ..., 'model_uri': ...}}, got {extra!r}")
    version = check_version(str(extra["version"]))
    model_uri = str(extra["model_uri"])
    try:
        check_uri(model_uri, "model_uri")
    except ValueError as e:
        raise SpecError(f"asset event extra: {e}") from None
    parts = PurePosixPath(model_uri.split("://", 1)[-1]).parts
    name = parts[-3] if len(parts) >= 3 else ""  # {registry}/{version}/model.pt: the registry's folder
    return ModelVersion(version=version, model_uri=model_uri, name=name)


def versions_to_compress(*, events: Iterable[Any], registry: str, processed_marker: str, model_filename: str = "model.pt") -> list[dict[str, str]]:
    """The versions to compress, oldest first, as dicts for XCom.

    `events`: the run's triggering Asset events (objects with `.extra`). Events that name no
    valid version are logged and left out; a version already processed is left out. When no
    event names a version (a scheduled or manual run), every unprocessed version in `registry`.
    """
    events = list(events)
    named: dict[str, ModelVersion] = {}
    for event in events:
        try:
            found = version_from_event(getattr(event, "extra", None))
        except SpecError as e:
            log.warning("ignored an asset event: %s", e)
            continue
        named.setdefault(found.version, found)
    if not named:
        if events:
            log.warning("no triggering asset event named a valid version; sweeping the registry %s instead", registry)
        pending = unprocessed_versions(registry, model_filename, processed_marker)
    else:
        pending = []
        for found in sorted(named.values(), key=lambda v: version_key(v.version)):
            marker = marker_uri(processed_marker, found.version, found.name)
            if store_for(marker).exists(marker):
                log.info("version %s is processed already (%s exists); not compressing it again", found.version, marker)
            else:
                pending.append(found)
    log.info("versions to compress: %s", ", ".join(v.version for v in pending) or "none")
    return [v.as_dict() for v in pending]
