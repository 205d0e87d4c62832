"""Content digests: the sha256 every artifact is recorded with and verified against."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def iter_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            yield path


def sha256_tree(root: Path) -> str:
    """Digest of a folder: relative paths and file digests, in sorted order."""
    h = hashlib.sha256()
    for path in iter_files(root):
        h.update(f"{path.relative_to(root).as_posix()}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()


def sha256_path(path: Path) -> str:
    return sha256_tree(path) if path.is_dir() else sha256_file(path)
