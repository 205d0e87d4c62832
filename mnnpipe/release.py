"""Release pointers: `<release root>/<model name>/latest.json` names the newest complete release.

A release is published like any output (files, then manifest.json last); only then does the
pointer move, through the store's compare-and-swap, and only forward in version order. So a
reader that follows `latest.json` always lands on a complete release, and two gates finishing at
once, or an older version finishing last, never leave it pointing backwards or at half an output.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

from .errors import StoreError
from .registry import version_key
from .store import MANIFEST, join, store_for

LATEST = "latest.json"


def release_prefix(release_root: str, name: str, version: str, digest: str) -> str:
    """Where a model version's release for one recipe digest is published (the gate's output)."""
    return join(release_root, name, version, digest)


def latest_uri(release_root: str, name: str) -> str:
    return join(release_root, name, LATEST)


#: The step after every release: the model's releases over its versions (trend.json, trend.html).
TREND_STEP = "trend"


def trend_prefix(release_root: str, name: str) -> str:
    """Where the trend of model `name`'s releases is published. Plain concatenation, so a KFP
    pipeline channel or an Airflow template passes through it as well as a URI."""
    return f"{release_root}/{name}/{TREND_STEP}"


def point_latest(release_root: str, name: str, version: str, release_prefix: str) -> bool:
    """Move `latest` to `release_prefix` unless it already names a newer version; True if moved."""
    manifest_uri = join(release_prefix, MANIFEST)
    store = store_for(manifest_uri)
    if not store.exists(manifest_uri):
        raise StoreError(f"{release_prefix}: has no {MANIFEST}; a pointer may only name a complete release")
    record = {
        "name": name,
        "version": version,
        "release": release_prefix.rstrip("/"),
        "manifest_sha256": hashlib.sha256(store.read_bytes(manifest_uri)).hexdigest(),
        "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }

    def update(current: bytes | None) -> bytes | None:
        if current is not None:
            try:
                if version_key(json.loads(current)["version"]) > version_key(version):
                    return None  # a newer release got there first
            except (ValueError, KeyError):
                pass  # unreadable pointer: replace it
        return json.dumps(record, indent=2, sort_keys=True).encode()

    pointer = latest_uri(release_root, name)
    return store_for(pointer).swap(pointer, update) is not None


def read_latest(release_root: str, name: str) -> dict | None:
    """The pointer's record, or None when nothing was released yet."""
    uri = latest_uri(release_root, name)
    store = store_for(uri)
    if not store.exists(uri):
        return None
    return json.loads(store.read_bytes(uri))
