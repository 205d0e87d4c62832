"""Artifact locations: joining and splitting URIs, and spelling local paths (plain or file://)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import InputError

MANIFEST = "manifest.json"
RESULT = "result.json"


def join(prefix: str, *parts: str) -> str:
    """Join URI parts with '/', whatever the scheme."""
    out = prefix.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    return bucket, key


def local_path(uri: str) -> Path:
    """The filesystem path of a plain path or a file:// URI (file:///abs or file://localhost/abs)."""
    if not uri.startswith("file://"):
        return Path(uri)
    host, _, path = uri[len("file://") :].partition("/")
    if host not in ("", "localhost"):
        raise InputError(f"{uri}: file:// URI names host '{host}'; expected file:///absolute/path or file://localhost/absolute/path")
    return Path("/" + path)


def same_location(a: str, b: str) -> bool:
    """Whether two URIs name the same object: S3 keys literally, local paths once normalised
    (file://, repeated slashes, '.' segments and symlinks all spell the same file)."""
    if a.startswith("s3://") or b.startswith("s3://"):
        return a == b
    return _local_key(a) == _local_key(b)


def _local_key(uri: str) -> str:
    return os.path.realpath(re.sub("/+", "/", str(local_path(uri))))
