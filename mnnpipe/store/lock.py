"""The output lock: one writer per output prefix at a time."""

from __future__ import annotations

import json
import os
import uuid

from ..errors import InputError, StoreError
from .backend import store_for
from .uris import join

LOCK = ".mnnpipe.lock"
_HELD_LOCKS: set[str] = set()  # ids of locks this process holds right now


class OutputLock:
    """One writer per output prefix at a time; a second concurrent run refuses (StoreError).

    The lock is a small object created with a conditional write (link() of a finished file
    locally, If-None-Match on S3). A lock left by a killed run is stale when its process is gone
    (same host) or when it is older than MNNPIPE_LOCK_TTL seconds (default 6 h), so a rerun after
    SIGKILL proceeds; a stale lock is taken over only with a compare-and-swap against the bytes
    judged stale (flock locally, If-Match on its ETag on S3), so two contenders never both win.
    """

    def __init__(self, output: str):
        import socket
        import time

        self.uri = join(output, LOCK)
        self.store = store_for(self.uri)
        self.body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "id": uuid.uuid4().hex}).encode()

    @property
    def id(self) -> str:
        return json.loads(self.body)["id"]

    def __enter__(self) -> OutputLock:
        for _ in range(20):
            if self.store.write_bytes(self.body, self.uri, if_absent=True):
                _HELD_LOCKS.add(self.id)
                return self
            raw = self._read()
            if raw is None:
                continue  # released between our create and our read: try the create again
            holder = _parse_lock(raw)
            if holder is not None and not self._stale(holder):
                raise StoreError(
                    f"{self.uri.rsplit('/', 1)[0]}: another run (pid {holder.get('pid')} on {holder.get('host')}) is writing this output; retry when it finishes"
                )
            # Stale (or unreadable): take it over only if it is still the very lock we judged,
            # with a compare-and-swap. Deleting and re-creating would let a contender that read
            # the same stale lock delete the fresh lock we just made.
            if self.store.swap(self.uri, lambda current: self.body if current == raw else None) is not None:
                _HELD_LOCKS.add(self.id)
                return self
        raise StoreError(f"{self.uri.rsplit('/', 1)[0]}: could not take this output's lock (too many concurrent runs); retry when they finish")

    def __exit__(self, *exc) -> None:
        _HELD_LOCKS.discard(self.id)
        try:
            holder = self._holder()
            if holder is not None and holder.get("id") == self.id:
                self.store.delete(self.uri)
        except StoreError:
            pass  # store unreachable: the lock goes stale with this process, never blocks a rerun for long

    def _read(self) -> bytes | None:
        try:
            return self.store.read_bytes(self.uri)
        except InputError:
            return None

    def _holder(self) -> dict | None:
        raw = self._read()
        return None if raw is None else _parse_lock(raw)

    @staticmethod
    def _stale(holder: dict) -> bool:
        import socket
        import time

        if time.time() - float(holder.get("since", 0)) > float(os.environ.get("MNNPIPE_LOCK_TTL", 6 * 3600)):
            return True
        if holder.get("host") == socket.gethostname():
            if int(holder.get("pid", 0)) == os.getpid():
                return holder.get("id") not in _HELD_LOCKS  # left by an earlier, failed run of ours
            try:
                os.kill(int(holder.get("pid", 0)), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError):
                return False
        return False


def _parse_lock(raw: bytes) -> dict | None:
    try:
        holder = json.loads(raw)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None
