"""The store interface, and which backend serves a URI."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Callable, Protocol

from .local import LocalStore
from .s3 import S3Settings, S3Store


class Store(Protocol):
    def exists(self, uri: str) -> bool: ...
    def is_prefix(self, uri: str) -> bool: ...
    def get(self, uri: str, dest: Path) -> None: ...
    def put(self, src: Path, uri: str, *, sha256: str | None = None) -> None: ...
    def read_bytes(self, uri: str) -> bytes: ...
    def write_bytes(self, data: bytes, uri: str, *, if_absent: bool = False) -> bool: ...
    def swap(self, uri: str, update: Callable[[bytes | None], bytes | None]) -> bytes | None: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, uri: str) -> None: ...


@lru_cache(maxsize=8)
def _s3_store(settings: S3Settings) -> S3Store:
    return S3Store(settings)


def store_for(uri: str) -> Store:
    """The store that serves `uri`: S3 for s3://, the local filesystem otherwise."""
    if uri.startswith("s3://"):
        return _s3_store(S3Settings.from_env())
    return LocalStore()
