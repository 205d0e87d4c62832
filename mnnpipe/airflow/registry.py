"""Model versions under a registry prefix, and which of them still need compressing.

Layout: `{registry}/{version}/{model_filename}` (e.g. `s3://models/digits/20261128T0930/model.pt`).
A version is *processed* once its marker exists (by default the manifest the compression DAG
publishes last for it, so a half-finished run does not count). The version to compress next is
the newest one, unless it is processed already: an older unprocessed version has been superseded
by a newer one and is never picked, so a backlog does not replay stale models.

Reads go through mnnpipe's store (file:// or s3://), the same seam the steps use.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from ..store import join, store_for


@dataclass(frozen=True)
class ModelVersion:
    version: str
    model_uri: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def version_key(version: str) -> tuple:
    """Natural order: 'v10' after 'v9'; timestamps and semver-like names sort as expected."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", version) if part)


def list_versions(registry: str, model_filename: str) -> list[ModelVersion]:
    """Every `{registry}/{version}/{model_filename}`, oldest first."""
    base = registry.rstrip("/") + "/"
    found = []
    for uri in store_for(base).list(base):
        rel = uri[len(base) :]
        parts = rel.split("/")
        if len(parts) == 2 and parts[1] == model_filename and parts[0]:
            found.append(ModelVersion(version=parts[0], model_uri=uri))
    return sorted(found, key=lambda v: version_key(v.version))


def marker_uri(processed_marker: str, version: str) -> str:
    return processed_marker.format(version=version)


def next_version(registry: str, model_filename: str, processed_marker: str) -> ModelVersion | None:
    """The newest version if it is not processed yet, else None (older ones are superseded)."""
    versions = list_versions(registry, model_filename)
    if not versions:
        return None
    newest = versions[-1]
    marker = marker_uri(processed_marker, newest.version)
    return None if store_for(marker).exists(marker) else newest


def default_marker(artifact_prefix: str, last_step: str) -> str:
    """`{artifact_prefix}/{version}/{last_step}/manifest.json`, with `{version}` left to fill."""
    return join(artifact_prefix, "{version}", last_step, "manifest.json")
