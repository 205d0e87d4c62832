"""Model versions under a registry prefix, and which of them still need compressing.

Layout: `{registry}/{version}/{model_filename}` (e.g. `s3://models/digits/20261128T0930/model.pt`).
A version is *processed* once its marker exists (by default the manifest the compression DAG
publishes last for it, so a half-finished run does not count). The version to compress next is
the newest one, unless it is processed already: an older unprocessed version has been superseded
by a newer one and is never picked, so a backlog does not replay stale models.

Two policies share this listing: Airflow's sensor compresses only the newest unprocessed version
(`next_version`); KFP's `recompress` starts a run for every version without a release for the
recipe (a recipe change recompresses the back catalogue). Reads go through mnnpipe's store
(file:// or s3://), the same seam the steps use.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath

from .store import join, store_for

#: Model files a version folder may hold when no exact file name is asked for.
MODEL_FILE = re.compile(r"^model\.(pt|ts|torchscript|pt2|pth|onnx)$")
VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class ModelVersion:
    version: str
    model_uri: str
    name: str = ""  # the registry folder's last segment, e.g. "digits"

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def version_key(version: str) -> tuple:
    """Natural order: 'v10' after 'v9'; timestamps and semver-like names sort as expected."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", version) if part)


def list_versions(registry: str, model_filename: str | None = None) -> list[ModelVersion]:
    """Every `{registry}/{version}/{model_filename}` (any `model.<ext>` when None), oldest first."""
    base = registry.rstrip("/") + "/"
    name = PurePosixPath(base.split("://", 1)[-1]).name
    found: dict[str, ModelVersion] = {}
    for uri in store_for(base).list(base):
        parts = uri[len(base) :].split("/")
        if len(parts) != 2 or not VERSION.match(parts[0]):
            continue
        if parts[1] == model_filename or (model_filename is None and MODEL_FILE.match(parts[1])):
            found.setdefault(parts[0], ModelVersion(version=parts[0], model_uri=uri, name=name))
    return sorted(found.values(), key=lambda v: version_key(v.version))


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
