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
import re
import shutil
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Protocol

from .errors import InputError, IntegrityError, SpecError, StoreError

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
    def put(self, src: Path, uri: str, *, sha256: str | None = None) -> None: ...
    def read_bytes(self, uri: str) -> bytes: ...
    def write_bytes(self, data: bytes, uri: str, *, if_absent: bool = False) -> bool: ...
    def swap(self, uri: str, update: Callable[[bytes | None], bytes | None]) -> bytes | None: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, uri: str) -> None: ...


# --------------------------------------------------------------------------- local folder


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
        """Invalid values are bad input (exit 2) naming the variable, not a boto3 traceback."""
        env = os.environ
        style = env.get("MNNPIPE_S3_ADDRESSING_STYLE", "auto")
        if style not in ("auto", "path", "virtual"):
            raise SpecError(f"MNNPIPE_S3_ADDRESSING_STYLE: expected auto, path or virtual, got '{style}'")
        endpoint = env.get("MNNPIPE_S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        if endpoint is not None and not endpoint.startswith(("http://", "https://")):
            raise SpecError(f"MNNPIPE_S3_ENDPOINT_URL: expected an http:// or https:// URL, got '{endpoint}'")
        return cls(
            endpoint_url=endpoint,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            addressing_style=style,
            max_attempts=_env_number("MNNPIPE_S3_MAX_ATTEMPTS", 5, int, 1),
            connect_timeout=_env_number("MNNPIPE_S3_CONNECT_TIMEOUT", 5.0, float, 0.1),
            read_timeout=_env_number("MNNPIPE_S3_READ_TIMEOUT", 60.0, float, 0.1),
            multipart_threshold=_env_number("MNNPIPE_S3_MULTIPART_THRESHOLD", 8 << 20, int, 1),
        )


def _env_number(name: str, default, kind: type, minimum):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not value >= minimum or value != value or value == float("inf"):
        what = "an integer" if kind is int else "a number"
        raise SpecError(f"{name}: expected {what} >= {minimum}, got '{raw}'")
    return value


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
        from botocore.exceptions import BotoCoreError

        self.settings = settings
        try:
            self.client = boto3.session.Session().client(
                "s3",
                endpoint_url=settings.endpoint_url,
                region_name=settings.region,
                config=Config(
                    # total_max_attempts counts the first try; botocore's "max_attempts" would
                    # count only retries, one more attempt than the setting says.
                    retries={"total_max_attempts": settings.max_attempts, "mode": "standard"},
                    connect_timeout=settings.connect_timeout,
                    read_timeout=settings.read_timeout,
                    s3={"addressing_style": settings.addressing_style},
                ),
            )
        except (BotoCoreError, ValueError) as e:  # e.g. an invalid AWS_* setting in the environment
            raise SpecError(f"S3 client configuration is invalid ({type(e).__name__}: {redact(str(e))})") from None
        self.transfer = TransferConfig(
            multipart_threshold=settings.multipart_threshold,
            multipart_chunksize=max(settings.multipart_threshold, 5 << 20),
            use_threads=True,
            max_concurrency=10,  # boto3's default: fewer parallel parts was measurably slower
            # botocore already retries each request max_attempts times; s3transfer's own download
            # attempts would multiply that (5 x), so the settings would not bound a stalled read.
            num_download_attempts=1,
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
        if isinstance(e, AttributeError):
            # urllib3/http.client report a connection closed under a stalled transfer this way
            return StoreError(f"{uri}: S3 {action} failed (the connection to {self.settings.endpoint_url or 'S3'} stalled or was closed mid-transfer)")
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

    def put(self, src: Path, uri: str, *, sha256: str | None = None) -> None:
        bucket, key = split_s3(uri)
        multipart = src.stat().st_size >= self.settings.multipart_threshold
        if multipart:
            self._abort_uploads(bucket, key)  # parts an earlier, failed attempt could not abort
        try:  # multipart above the threshold; S3 makes the object visible only when complete
            self.client.upload_file(
                str(src), bucket, key, Config=self.transfer, ExtraArgs={"Metadata": {"sha256": sha256 or sha256_file(src)}}
            )
        except Exception as e:
            raise self._fail("upload", uri, e) from None

    def _abort_uploads(self, bucket: str, key: str) -> None:
        """Abort unfinished multipart uploads of `key` (ours: one writer per output holds its lock),
        so a failed upload leaves no orphaned parts billed on the server. s3transfer aborts a
        failed upload itself, but that abort is lost when the server is down at the time, so the
        next upload of the same key (the rerun) clears what is left first. Trying again at once
        would only add another full retry window to a failure while the server is away."""
        try:
            resp = self.client.list_multipart_uploads(Bucket=bucket, Prefix=key)
            for upload in resp.get("Uploads", []):
                if upload.get("Key") == key:
                    self.client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"])
        except Exception:
            pass  # the store is unreachable: the upload error itself is what the user needs

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


def iter_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            yield path


# --------------------------------------------------------------------------- output lock

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
