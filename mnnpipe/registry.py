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

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath

from .errors import SpecError
from .store import join, store_for

log = logging.getLogger(__name__)

#: Model files a version folder may hold when no exact file name is asked for.
MODEL_FILE = re.compile(r"^model\.(pt|ts|torchscript|pt2|pth|onnx)$")
VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
VERSION_RULE = "1-128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"


def check_version(version: str) -> str:
    """`version` if it is a name the registry lists; else SpecError. Call it where a version is
    published, so a folder the registry would skip is never written in the first place."""
    if not isinstance(version, str) or not VERSION.match(version):
        raise SpecError(f"model version '{version}': not a valid version name (expected {VERSION_RULE})")
    return version


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
    skipped: dict[str, str] = {}  # folder -> why, logged once each: a skipped version is never silent
    for uri in store_for(base).list(base):
        parts = uri[len(base) :].split("/")
        if len(parts) < 2:
            continue  # a file beside the version folders
        if not VERSION.match(parts[0]):
            skipped.setdefault(parts[0], f"not a valid version name (expected {VERSION_RULE})")
        elif len(parts) == 2 and (parts[1] == model_filename or (model_filename is None and MODEL_FILE.match(parts[1]))):
            found.setdefault(parts[0], ModelVersion(version=parts[0], model_uri=uri, name=name))
        else:
            expected = model_filename or "model.<pt|ts|torchscript|pt2|pth|onnx>"
            skipped.setdefault(parts[0], f"holds no {expected} directly inside it")
    for folder, why in sorted(skipped.items()):
        if folder not in found:
            log.warning("model registry %s: skipped folder '%s': %s", registry, folder, why)
    return sorted(found.values(), key=lambda v: version_key(v.version))


def marker_uri(processed_marker: str, version: str, name: str = "") -> str:
    """`processed_marker` with `{version}` (and `{name}`, the registry folder's name) filled in."""
    return processed_marker.replace("{version}", version).replace("{name}", name)


def next_version(registry: str, model_filename: str, processed_marker: str) -> ModelVersion | None:
    """The newest version if it is not processed yet, else None (older ones are superseded)."""
    versions = list_versions(registry, model_filename)
    if not versions:
        return None
    newest = versions[-1]
    marker = marker_uri(processed_marker, newest.version, newest.name)
    return None if store_for(marker).exists(marker) else newest


def unprocessed_versions(registry: str, model_filename: str, processed_marker: str) -> list[ModelVersion]:
    """Every version without its marker, oldest first: the back catalogue a sweep compresses."""
    pending = []
    for found in list_versions(registry, model_filename):
        marker = marker_uri(processed_marker, found.version, found.name)
        if store_for(marker).exists(marker):
            log.info("model registry %s: version %s is processed already (%s exists)", registry, found.version, marker)
        else:
            pending.append(found)
    return pending


def default_marker(artifact_prefix: str, last_step: str) -> str:
    """`{artifact_prefix}/{version}/{last_step}/manifest.json`, with `{version}` left to fill."""
    return join(artifact_prefix, "{version}", last_step, "manifest.json")
