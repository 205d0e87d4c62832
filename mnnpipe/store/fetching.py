"""Fetching artifacts to a local path, verified against the digests a manifest records."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from ..errors import InputError, IntegrityError
from .backend import store_for
from .hashing import sha256_file
from .uris import MANIFEST, join, local_path, same_location, split_s3


def fetch(uri: str, dest_dir: Path) -> Path:
    """Bring a file or a folder (prefix) to `dest_dir`; returns the local path.

    Local files are used in place (no copy). When a sibling manifest.json records the file's
    digest, the bytes are verified against it.
    """
    store = store_for(uri)
    if not uri.startswith("s3://"):
        path = local_path(uri)
        if not path.exists():
            raise InputError(f"{uri}: no such file or folder")
        _verify_against_manifest(uri, path)
        return path
    if store.exists(uri):
        dest = dest_dir / uuid.uuid4().hex[:8] / Path(split_s3(uri)[1]).name
        store.get(uri, dest)
        _verify_against_manifest(uri, dest)
        return dest
    if store.is_prefix(uri):
        root = dest_dir / uuid.uuid4().hex[:8] / (Path(split_s3(uri.rstrip("/"))[1]).name or "data")
        base = uri.rstrip("/") + "/"
        for obj in store.list(uri):
            rel = obj[len(base) :]
            if rel == "" or rel.endswith("/"):
                continue  # a folder marker (a zero-byte "dir/" key some tools create), not a file
            if ".." in Path(rel).parts or rel.startswith("/"):
                raise InputError(f"{obj}: object key escapes its prefix")
            store.get(obj, root / rel)
        return root
    raise InputError(f"{uri}: no such object or prefix")


def _verify_against_manifest(uri: str, path: Path) -> None:
    """Verify a file against the manifest beside it, if there is one. A manifest that exists but
    cannot be parsed vouches for nothing: reading beside it is refused, not left unchecked."""
    if not path.is_file():
        return
    parent = uri.rsplit("/", 1)[0] if "/" in uri else "."
    manifest_uri = join(parent, MANIFEST)
    store = store_for(manifest_uri)
    if not store.exists(manifest_uri):
        return
    try:
        artifacts = json.loads(store.read_bytes(manifest_uri))["artifacts"]
        entries = [(a["uri"], a["sha256"], a["size"]) for a in artifacts.values()]
    except InputError:
        return  # removed between the two calls: nothing vouches for the file, as before it existed
    except (ValueError, KeyError, TypeError, AttributeError):
        raise IntegrityError(f"{manifest_uri}: manifest is unreadable (corrupt or truncated); refusing to read {uri} unverified") from None
    for art_uri, sha256, size in entries:
        if same_location(art_uri, uri):
            verify_file(path, sha256, size, uri)


def fetch_verified(uri: str, sha256: str, size: int, dest_dir: Path) -> Path:
    """A local copy of one artifact (local files in place), checked against a digest we trust."""
    if uri.startswith("s3://"):
        path = dest_dir / uuid.uuid4().hex[:8] / Path(split_s3(uri)[1]).name
        store_for(uri).get(uri, path)
    else:
        path = local_path(uri)
        if not path.is_file():
            raise InputError(f"{uri}: no such file")
    verify_file(path, sha256, size, uri)
    return path


def verify_file(path: Path, sha256: str, size: int, label: str) -> None:
    actual_size = path.stat().st_size
    if actual_size != size:
        raise IntegrityError(f"{label}: size {actual_size} bytes, manifest says {size}")
    actual = sha256_file(path)
    if actual != sha256:
        raise IntegrityError(f"{label}: sha256 {actual[:12]}…, manifest says {sha256[:12]}…")
