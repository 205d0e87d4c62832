"""Artifact stores: a local folder (the embedded default) and S3-compatible object storage.

The store is the one seam for I/O and credentials: no step touches boto3 or the filesystem
outside its own work folder. Every artifact is recorded with sha256 and size, downloads are
verified, and an output is published data first, `manifest.json` last, so a reader that trusts
only outputs with a manifest never sees a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Protocol

from .errors import InputError, IntegrityError, StoreError

MANIFEST = "manifest.json"
RESULT = "result.json"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def sha256_tree(root: Path) -> str:
    """Digest of a folder: relative paths and file digests, in sorted order."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(root).as_posix()}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()


def sha256_path(path: Path) -> str:
    return sha256_tree(path) if path.is_dir() else sha256_file(path)


def join(prefix: str, *parts: str) -> str:
    """Join URI parts with '/', whatever the scheme."""
    out = prefix.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def redact(text: str) -> str:
    """Remove credential values known to this process from a message before it is shown."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


class Store(Protocol):
    def exists(self, uri: str) -> bool: ...
    def is_prefix(self, uri: str) -> bool: ...
    def get(self, uri: str, dest: Path) -> None: ...
    def put(self, src: Path, uri: str) -> None: ...
    def read_bytes(self, uri: str) -> bytes: ...
    def write_bytes(self, data: bytes, uri: str, *, if_absent: bool = False) -> bool: ...
    def swap(self, uri: str, update: Callable[[bytes | None], bytes | None]) -> bytes | None: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, uri: str) -> None: ...


# --------------------------------------------------------------------------- local folder


def local_path(uri: str) -> Path:
    return Path(uri[len("file://") :] if uri.startswith("file://") else uri)


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

    def put(self, src: Path, uri: str) -> None:
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
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:  # O_EXCL: exactly one concurrent writer wins
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return True
        self._atomic(dest, lambda tmp: tmp.write_bytes(data))
        return True

    def swap(self, uri: str, update: Callable[[bytes | None], bytes | None]) -> bytes | None:
        """Compare-and-swap: `update(current)` returns the new bytes, or None to leave it. Writers
        are serialised by an O_EXCL lock file (stale after 60 s, e.g. after a SIGKILL)."""
        import time

        dest = local_path(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        lock = dest.with_name(f".{dest.name}.lock")
        deadline = time.monotonic() + 120
        while True:
            try:
                os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                break
            except FileExistsError:
                try:
                    if time.time() - lock.stat().st_mtime > 60:
                        lock.unlink(missing_ok=True)
                        continue
                except FileNotFoundError:
                    continue
                if time.monotonic() > deadline:
                    raise StoreError(f"{uri}: could not lock for update within 120 s") from None
                time.sleep(0.01)
        try:
            current = dest.read_bytes() if dest.exists() else None
            new = update(current)
            if new is not None:
                self._atomic(dest, lambda tmp: tmp.write_bytes(new))
            return new
        finally:
            lock.unlink(missing_ok=True)

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


# --------------------------------------------------------------------------- S3


@dataclass(frozen=True)
class S3Settings:
    """Where and how to reach S3. Read from the environment, never from specs, so no credential
    or endpoint secret ends up in a spec, result or manifest. Credentials come from boto3's own
    chain (env, shared config, instance/pod identity)."""

    endpoint_url: str | None
    region: str
    addressing_style: str
    max_attempts: int
    connect_timeout: float
    read_timeout: float
    multipart_threshold: int

    @classmethod
    def from_env(cls) -> S3Settings:
        env = os.environ
        return cls(
            endpoint_url=env.get("MNNPIPE_S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            addressing_style=env.get("MNNPIPE_S3_ADDRESSING_STYLE", "auto"),
            max_attempts=int(env.get("MNNPIPE_S3_MAX_ATTEMPTS", "5")),
            connect_timeout=float(env.get("MNNPIPE_S3_CONNECT_TIMEOUT", "5")),
            read_timeout=float(env.get("MNNPIPE_S3_READ_TIMEOUT", "60")),
            multipart_threshold=int(env.get("MNNPIPE_S3_MULTIPART_THRESHOLD", str(8 << 20))),
        )


def split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    return bucket, key


class S3Store:
    """S3-compatible object storage through boto3 (AWS, MinIO, Ceph RGW, SeaweedFS, moto)."""

    def __init__(self, settings: S3Settings):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.settings = settings
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,
            config=Config(
                retries={"max_attempts": settings.max_attempts, "mode": "standard"},
                connect_timeout=settings.connect_timeout,
                read_timeout=settings.read_timeout,
                s3={"addressing_style": settings.addressing_style},
            ),
        )
        self.transfer = TransferConfig(
            multipart_threshold=settings.multipart_threshold,
            multipart_chunksize=max(settings.multipart_threshold, 5 << 20),
            use_threads=True,
            max_concurrency=4,
        )

    def _fail(self, action: str, uri: str, e: Exception) -> StoreError | InputError:
        from botocore.exceptions import ClientError

        if isinstance(e, ClientError):
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound"):
                return InputError(f"{uri}: no such object")
            if code == "NoSuchBucket":
                return InputError(f"{uri}: bucket does not exist")
            return StoreError(f"{uri}: S3 {action} failed ({code or 'error'}: {redact(str(e.response.get('Error', {}).get('Message', '')))})")
        return StoreError(f"{uri}: S3 {action} failed ({type(e).__name__}: {redact(str(e))})")

    def exists(self, uri: str) -> bool:
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            self.client.head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._fail("head", uri, e) from None
        except Exception as e:  # connection errors after retries
            raise self._fail("head", uri, e) from None

    def is_prefix(self, uri: str) -> bool:
        bucket, key = split_s3(uri.rstrip("/") + "/")
        try:
            resp = self.client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
        except Exception as e:
            raise self._fail("list", uri, e) from None
        return resp.get("KeyCount", 0) > 0

    def get(self, uri: str, dest: Path) -> None:
        bucket, key = split_s3(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part-{uuid.uuid4().hex[:8]}")
        try:
            self.client.download_file(bucket, key, str(tmp), Config=self.transfer)
            os.replace(tmp, dest)
        except Exception as e:
            raise self._fail("download", uri, e) from None
        finally:
            tmp.unlink(missing_ok=True)

    def put(self, src: Path, uri: str) -> None:
        bucket, key = split_s3(uri)
        try:  # multipart above the threshold; S3 makes the object visible only when complete
            self.client.upload_file(
                str(src), bucket, key, Config=self.transfer, ExtraArgs={"Metadata": {"sha256": sha256_file(src)}}
            )
        except Exception as e:
            raise self._fail("upload", uri, e) from None

    def read_bytes(self, uri: str) -> bytes:
        bucket, key = split_s3(uri)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as e:
            raise self._fail("get", uri, e) from None

    def write_bytes(self, data: bytes, uri: str, *, if_absent: bool = False) -> bool:
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        extra = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            self.client.put_object(Bucket=bucket, Key=key, Body=data, **extra)
            return True
        except ClientError as e:
            if if_absent and e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise self._fail("put", uri, e) from None
        except Exception as e:
            raise self._fail("put", uri, e) from None

    def swap(self, uri: str, update: Callable[[bytes | None], bytes | None]) -> bytes | None:
        """Compare-and-swap with S3 conditional writes (If-Match on the ETag read, If-None-Match
        when absent); a concurrent writer makes the put fail with 412 and we re-read and retry."""
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        for _ in range(20):
            try:
                obj = self.client.get_object(Bucket=bucket, Key=key)
                current, condition = obj["Body"].read(), {"IfMatch": obj["ETag"]}
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404"):
                    raise self._fail("get", uri, e) from None
                current, condition = None, {"IfNoneMatch": "*"}
            except Exception as e:
                raise self._fail("get", uri, e) from None
            new = update(current)
            if new is None:
                return None
            try:
                self.client.put_object(Bucket=bucket, Key=key, Body=new, **condition)
                return new
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                    raise self._fail("put", uri, e) from None
            except Exception as e:
                raise self._fail("put", uri, e) from None
        raise StoreError(f"{uri}: too many concurrent updates; gave up after 20 attempts")

    def list(self, prefix: str) -> list[str]:
        bucket, key = split_s3(prefix.rstrip("/") + "/")
        out: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
                out += [f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", [])]
        except Exception as e:
            raise self._fail("list", prefix, e) from None
        return sorted(out)

    def delete(self, uri: str) -> None:
        bucket, key = split_s3(uri)
        try:
            self.client.delete_object(Bucket=bucket, Key=key)
        except Exception as e:
            raise self._fail("delete", uri, e) from None


@lru_cache(maxsize=8)
def _s3_store(settings: S3Settings) -> S3Store:
    return S3Store(settings)


def store_for(uri: str) -> Store:
    """The store that serves `uri`: S3 for s3://, the local filesystem otherwise."""
    if uri.startswith("s3://"):
        return _s3_store(S3Settings.from_env())
    return LocalStore()


# --------------------------------------------------------------------------- fetch and publish


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
            if ".." in Path(rel).parts or rel.startswith("/"):
                raise InputError(f"{obj}: object key escapes its prefix")
            store.get(obj, root / rel)
        return root
    raise InputError(f"{uri}: no such object or prefix")


def _verify_against_manifest(uri: str, path: Path) -> None:
    if not path.is_file():
        return
    parent = uri.rsplit("/", 1)[0]
    manifest_uri = join(parent, MANIFEST)
    store = store_for(manifest_uri)
    try:
        if not store.exists(manifest_uri):
            return
        manifest = json.loads(store.read_bytes(manifest_uri))
    except (InputError, ValueError):
        return
    for art in manifest.get("artifacts", {}).values():
        if art.get("uri") == uri:
            verify_file(path, art["sha256"], art["size"], uri)


def verify_file(path: Path, sha256: str, size: int, label: str) -> None:
    actual_size = path.stat().st_size
    if actual_size != size:
        raise IntegrityError(f"{label}: size {actual_size} bytes, manifest says {size}")
    actual = sha256_file(path)
    if actual != sha256:
        raise IntegrityError(f"{label}: sha256 {actual[:12]}…, manifest says {sha256[:12]}…")


def iter_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            yield path


def staging_dir(prefix: str = "mnnpipe-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


# --------------------------------------------------------------------------- output lock

LOCK = ".mnnpipe.lock"
_HELD_LOCKS: set[str] = set()  # ids of locks this process holds right now


class OutputLock:
    """One writer per output prefix at a time; a second concurrent run refuses (StoreError).

    The lock is a small object created with a conditional write (O_EXCL locally, If-None-Match
    on S3). A lock left by a killed run is stale when its process is gone (same host) or when it
    is older than MNNPIPE_LOCK_TTL seconds (default 6 h), so a rerun after SIGKILL proceeds.
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
        if self.store.write_bytes(self.body, self.uri, if_absent=True):
            _HELD_LOCKS.add(self.id)
            return self
        holder = self._holder()
        if holder is not None and not self._stale(holder):
            raise StoreError(
                f"{self.uri.rsplit('/', 1)[0]}: another run (pid {holder.get('pid')} on {holder.get('host')}) is writing this output; retry when it finishes"
            )
        self.store.delete(self.uri)  # stale: its writer is gone
        if not self.store.write_bytes(self.body, self.uri, if_absent=True):
            raise StoreError(f"{self.uri.rsplit('/', 1)[0]}: another run took this output's lock first; retry when it finishes")
        _HELD_LOCKS.add(self.id)
        return self

    def __exit__(self, *exc) -> None:
        _HELD_LOCKS.discard(self.id)
        try:
            holder = self._holder()
            if holder is not None and holder.get("id") == self.id:
                self.store.delete(self.uri)
        except StoreError:
            pass  # store unreachable: the lock goes stale with this process, never blocks a rerun for long

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.store.read_bytes(self.uri))
        except (InputError, ValueError):
            return None

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
