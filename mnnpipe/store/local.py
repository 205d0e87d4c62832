"""The local-folder store: plain files, written atomically."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

from ..errors import InputError, StoreError
from .uris import local_path


class LocalStore:
    """Plain files. Writes go to a temporary sibling and are renamed into place (atomic)."""

    def exists(self, uri: str) -> bool:
        return local_path(uri).is_file()

    def is_prefix(self, uri: str) -> bool:
        return local_path(uri).is_dir()

    def get(self, uri: str, dest: Path) -> None:
        src = local_path(uri)
        if not src.is_file():
            raise InputError(f"{uri}: no such file")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)

    def put(self, src: Path, uri: str, *, sha256: str | None = None) -> None:
        dest = local_path(uri)
        self._atomic(dest, lambda tmp: shutil.copyfile(src, tmp))

    def read_bytes(self, uri: str) -> bytes:
        try:
            return local_path(uri).read_bytes()
        except FileNotFoundError:
            raise InputError(f"{uri}: no such file") from None
        except OSError as e:
            raise StoreError(f"{uri}: cannot read ({e.strerror})") from None

    def write_bytes(self, data: bytes, uri: str, *, if_absent: bool = False) -> bool:
        dest = local_path(uri)
        if if_absent:
            # link() of a finished temporary fails if the name exists: exactly one concurrent
            # writer wins, and no reader ever sees the file empty or half-written.
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
                try:
                    with open(tmp, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    os.link(tmp, dest)
                except FileExistsError:
                    return False
                finally:
                    tmp.unlink(missing_ok=True)
            except OSError as e:
                raise StoreError(f"{dest}: cannot write ({e.strerror})") from None
            return True
        self._atomic(dest, lambda tmp: tmp.write_bytes(data))
        return True

    def swap(self, uri: str, update: Callable[[bytes | None], bytes | None]) -> bytes | None:
        """Compare-and-swap: `update(current)` returns the new bytes, or None to leave it. Writers
        are serialised by flock() on the containing folder: the kernel releases it when a holder
        dies, so there is no stale lock to guess about and nothing is left beside the file."""
        import fcntl
        import time

        dest = local_path(uri)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise StoreError(f"{uri}: cannot open its folder ({e.strerror})") from None
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StoreError(f"{uri}: could not lock for update within 120 s") from None
                    time.sleep(0.01)
            current = dest.read_bytes() if dest.exists() else None
            new = update(current)
            if new is not None:
                self._atomic(dest, lambda tmp: tmp.write_bytes(new))
            return new
        finally:
            os.close(fd)  # releases the flock

    def list(self, prefix: str) -> list[str]:
        root = local_path(prefix)
        if not root.is_dir():
            return []
        base = prefix.rstrip("/")
        return [f"{base}/{p.relative_to(root).as_posix()}" for p in sorted(root.rglob("*")) if p.is_file()]

    def delete(self, uri: str) -> None:
        local_path(uri).unlink(missing_ok=True)

    @staticmethod
    def _atomic(dest: Path, write) -> None:
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
            try:
                write(tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as e:
            raise StoreError(f"{dest}: cannot write ({e.strerror})") from None
