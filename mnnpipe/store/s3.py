"""The S3 store: S3-compatible object storage through boto3, its client settings, and the one
reading of S3's error codes (`s3_error`)."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import InputError, SpecError, StoreError
from .hashing import sha256_file
from .uris import split_s3


def redact(text: str) -> str:
    """Remove credential values known to this process from a message before it is shown."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


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


# What an S3 error reply means to the store. The same condition has several spellings: a HEAD
# reply has no body, so botocore reports the bare HTTP status ("404", "412"), other requests
# carry S3's named codes, and servers differ ("NotFound", "ConditionalRequestConflict").
MISSING = "missing"  # no such key
NO_BUCKET = "no-bucket"
CONFLICT = "conflict"  # a conditional write (If-None-Match / If-Match) lost to another writer
OTHER = "other"
_MISSING_CODES = ("404", "NoSuchKey", "NotFound")
_CONFLICT_CODES = ("PreconditionFailed", "412", "ConditionalRequestConflict")


@dataclass(frozen=True)
class S3Failure:
    """An S3 error reply: its kind (MISSING, NO_BUCKET, CONFLICT or OTHER), code and message."""

    kind: str
    code: str
    message: str


def s3_error(e: BaseException) -> S3Failure | None:
    """What the S3 server answered, or None when `e` is no server reply (a connection error,
    a timeout). The one place a botocore ClientError's code is read."""
    from botocore.exceptions import ClientError

    if not isinstance(e, ClientError):
        return None
    error = e.response.get("Error", {})
    code = error.get("Code") or ""
    if code in _MISSING_CODES:
        kind = MISSING
    elif code == "NoSuchBucket":
        kind = NO_BUCKET
    elif code in _CONFLICT_CODES:
        kind = CONFLICT
    else:
        kind = OTHER
    return S3Failure(kind, code, str(error.get("Message", "")))


def _is(e: BaseException, kind: str) -> bool:
    failure = s3_error(e)
    return failure is not None and failure.kind == kind


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
        failure = s3_error(e)
        if failure is not None:
            if failure.kind == MISSING:
                return InputError(f"{uri}: no such object")
            if failure.kind == NO_BUCKET:
                return InputError(f"{uri}: bucket does not exist")
            return StoreError(f"{uri}: S3 {action} failed ({failure.code or 'error'}: {redact(failure.message)})")
        if isinstance(e, AttributeError):
            # urllib3/http.client report a connection closed under a stalled transfer this way
            return StoreError(f"{uri}: S3 {action} failed (the connection to {self.settings.endpoint_url or 'S3'} stalled or was closed mid-transfer)")
        return StoreError(f"{uri}: S3 {action} failed ({type(e).__name__}: {redact(str(e))})")

    def exists(self, uri: str) -> bool:
        bucket, key = split_s3(uri)
        try:
            self.client.head_object(Bucket=bucket, Key=key)
            return True
        except Exception as e:  # no such key; or connection errors after retries
            if _is(e, MISSING):
                return False
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
        bucket, key = split_s3(uri)
        extra = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            self.client.put_object(Bucket=bucket, Key=key, Body=data, **extra)
            return True
        except Exception as e:
            if if_absent and _is(e, CONFLICT):
                return False
            raise self._fail("put", uri, e) from None

    def swap(self, uri: str, update: Callable[[bytes | None], bytes | None]) -> bytes | None:
        """Compare-and-swap with S3 conditional writes (If-Match on the ETag read, If-None-Match
        when absent); a concurrent writer makes the put fail with 412 and we re-read and retry."""
        bucket, key = split_s3(uri)
        for _ in range(20):
            try:
                obj = self.client.get_object(Bucket=bucket, Key=key)
                current, condition = obj["Body"].read(), {"IfMatch": obj["ETag"]}
            except Exception as e:
                if not _is(e, MISSING):
                    raise self._fail("get", uri, e) from None
                current, condition = None, {"IfNoneMatch": "*"}
            new = update(current)
            if new is None:
                return None
            try:
                self.client.put_object(Bucket=bucket, Key=key, Body=new, **condition)
                return new
            except Exception as e:
                if not _is(e, CONFLICT):
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
