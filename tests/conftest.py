"""Shared fixtures. Services are real and started here: an S3-compatible HTTP server (moto's
server mode) on 127.0.0.1, talked to by boto3 exactly as it would talk to MinIO."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import pytest

# Isolate every run from the developer's own caches and credentials before anything imports boto3.
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="mnnpipe-tests-"))
os.environ["XDG_CACHE_HOME"] = str(_SESSION_TMP / "cache")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "mnnpipe-test-key")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "mnnpipe-test-secret-sentinel")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)
os.environ.pop("MNNPIPE_CACHE_URI", None)
# Tiny models on a 2-core machine: one torch thread per process is several times faster than
# two threads fighting the other test processes (measured: 3 digits epochs 91 s -> ~15 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")


class S3Server:
    """A moto S3 server on 127.0.0.1 that tests can stop and restart on the same port."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._cls = ThreadedMotoServer
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, self.port = self.server.get_host_and_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop()

    def restart(self) -> None:
        self.server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket; MNNPIPE_S3_ENDPOINT_URL points mnnpipe's store at the test server."""
    from mnnpipe import store

    monkeypatch.setenv("MNNPIPE_S3_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("MNNPIPE_S3_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("MNNPIPE_S3_CONNECT_TIMEOUT", "1")
    store._s3_store.cache_clear()
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    yield name
    store._s3_store.cache_clear()


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A private cache index per test, so one test's outputs never serve another's."""
    path = tmp_path / "cache-index"
    monkeypatch.setenv("MNNPIPE_CACHE_URI", str(path))
    return path
