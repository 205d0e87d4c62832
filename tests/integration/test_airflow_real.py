"""The bundled DAGs on a REAL Airflow: api-server, scheduler, dag-processor and triggerer as
separate processes (LocalExecutor on SQLite, AIRFLOW_HOME in a temp dir, the project's dags/
copied in, steps in-process against the moto S3 server on 127.0.0.1).

One end-to-end run per trigger path, both without a logical date (what a manual trigger gets
in Airflow 3):
- CLI: `airflow dags trigger example_training_handoff`; its Asset event then starts
  `mnn_recompress_on_new_model`, which compresses the version the hand-off published.
- REST: POST /api/v2/dags/mnn_nightly_compression/dagRuns with a JWT from the simple auth manager.
Every wait is bounded; teardown kills every process group it started; on failure the services'
logs and the task logs are printed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest

pytest.importorskip("airflow.sdk", reason="needs the airflow extra")

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SERVICES = ("api-server", "scheduler", "dag-processor", "triggerer")
DAG_IDS = ("example_training_handoff", "mnn_nightly_compression", "mnn_recompress_on_new_model")
START_TIMEOUT = 120
RUN_TIMEOUT = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AirflowCluster:
    """Airflow's four services as child processes, each in its own process group."""

    def __init__(self, home: Path, extra_env: dict[str, str]) -> None:
        self.home = home
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.password = secrets.token_urlsafe(12)
        (home / "dags").mkdir(parents=True)
        for dag_file in (REPO / "dags").glob("*.py"):
            shutil.copy(dag_file, home / "dags" / dag_file.name)
        passwords = home / "passwords.json"
        passwords.write_text(json.dumps({"admin": self.password}))
        self.env = {
            **os.environ,
            **extra_env,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        }
        self.processes: dict[str, subprocess.Popen] = {}
        self.token = ""

    # ------------------------------------------------------------------ processes

    def airflow(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "airflow"), *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def start(self) -> None:
        migrated = self.airflow("db", "migrate", timeout=300)
        assert migrated.returncode == 0, migrated.stderr[-3000:]
        for service in SERVICES:
            log = open(self.home / f"{service}.log", "wb")
            self.processes[service] = subprocess.Popen(
                [str(BIN / "airflow"), service], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                self.token = self._token()
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1)
        else:
            raise TimeoutError(f"api-server did not answer on {self.url} within {START_TIMEOUT}s")
        while time.monotonic() < deadline:  # every bundled DAG parsed and serialized
            found = {d["dag_id"] for d in self.get("/api/v2/dags?limit=100")["dags"]}
            if set(DAG_IDS) <= found:
                return
            time.sleep(2)
        raise TimeoutError(f"DAGs not parsed within {START_TIMEOUT}s: {self.get('/api/v2/importErrors')}")

    def _check_alive(self) -> None:
        for service, proc in self.processes.items():
            if proc.poll() is not None:
                raise RuntimeError(f"airflow {service} exited with {proc.returncode}")

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.processes.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.processes.values():  # and whatever the services left behind (task runners)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)

    def dump_logs(self) -> str:
        parts = []
        for path in sorted(self.home.glob("*.log")) + sorted((self.home / "logs").rglob("*.log")):
            text = path.read_text(errors="replace")
            parts.append(f"===== {path.relative_to(self.home)} (last 8000 chars)\n{text[-8000:]}")
        return "\n".join(parts)

    # ------------------------------------------------------------------ REST

    def _token(self) -> str:
        body = json.dumps({"username": "admin", "password": self.password}).encode()
        req = urllib.request.Request(f"{self.url}/auth/token", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())["access_token"]

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        data = json.dumps(body).encode() if body is not None else None
        for attempt in range(4):
            req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                # SQLite has one writer: a request that meets the scheduler's write lock for its
                # busy timeout fails with 500 and rolls back; it is safe to send again.
                if e.code < 500 or attempt == 3:
                    raise
                time.sleep(2 * (attempt + 1))
        raise AssertionError("unreachable")

    def get(self, path: str) -> dict:
        return self._call("GET", path)

    def post(self, path: str, body: dict) -> dict:
        return self._call("POST", path, body)

    def runs(self, dag_id: str) -> list[dict]:
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns?limit=50")["dag_runs"]

    def wait_for_run(self, dag_id: str, deadline: float, *, run_id: str | None = None, run_type: str | None = None) -> dict:
        """The run (`run_id`, else the first of `run_type`) once it finished; fails on timeout."""
        while time.monotonic() < deadline:
            self._check_alive()
            runs = [r for r in self.runs(dag_id) if run_id in (None, r["dag_run_id"]) and run_type in (None, r["run_type"])]
            if runs and runs[0]["state"] in ("success", "failed"):
                return runs[0]
            time.sleep(3)
        raise TimeoutError(f"{dag_id} run {run_id or '(any)'} not finished in time: {self.runs(dag_id)}")

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str]:
        """{task_id: state}, mapped instances as `task_id[map_index]`."""
        tis = self.get(f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances")["task_instances"]
        return {ti["task_id"] + (f"[{ti['map_index']}]" if ti["map_index"] >= 0 else ""): ti["state"] for ti in tis}

    def xcom(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1):
        path = f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}/xcomEntries/return_value"
        return self.get(f"{path}?map_index={map_index}&deserialize=true")["value"]


@pytest.fixture(scope="module")
def bucket(s3_server):
    name = f"real-{uuid.uuid4().hex[:10]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def cluster(s3_server, bucket, tmp_path_factory, request):
    home = tmp_path_factory.mktemp("airflow-home")
    cluster = AirflowCluster(
        home,
        {
            "MNNPIPE_AIRFLOW_EXECUTION": "in_process",
            "MNNPIPE_S3_ENDPOINT_URL": s3_server.endpoint,
            # Unpausing a cron DAG starts its latest tick at once (catchup=False): those runs
            # find an empty registry and end in seconds; the runs under test name the real one.
            "MNNPIPE_MODEL_REGISTRY": f"s3://{bucket}/empty-registry",
            "MNNPIPE_ARTIFACT_PREFIX": f"s3://{bucket}/artifacts",
            "MNNPIPE_CACHE_URI": str(home / "mnnpipe-cache"),
            "OMP_NUM_THREADS": "1",
        },
    )
    started = time.monotonic()
    try:
        cluster.start()
        cluster.start_seconds = time.monotonic() - started
        yield cluster
    except BaseException:
        sys.stderr.write(cluster.dump_logs())
        raise
    finally:
        if request.session.testsfailed:
            sys.stderr.write(cluster.dump_logs())
        cluster.stop()


def _released_events(cluster: AirflowCluster, run_id: str) -> list[str]:
    """Versions named by the "compressed model released" Asset events a run emitted."""
    events = cluster.get("/api/v2/assets/events?limit=100")["asset_events"]
    return [e["extra"]["version"] for e in events if e["source_run_id"] == run_id and e["name"] == "mnnpipe_compressed_model_released"]


def _task_log(cluster: AirflowCluster, dag_id: str, run_id: str, task_id: str) -> str:
    """The task's log file as the LocalExecutor's task runner wrote it (every attempt)."""
    folder = cluster.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
    return "\n".join(p.read_text(errors="replace") for p in sorted(folder.rglob("*.log")))


def _keys(s3_server, bucket: str, prefix: str) -> set[str]:
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


@pytest.fixture(scope="module")
def nightly_registry(s3_server, bucket, tmp_path_factory) -> str:
    """A registry of its own for the nightly run (the hand-off publishes into another one), with
    one version of a digits CNN trained for one epoch on a few samples."""
    from mnnpipe.data import load_dataset
    from mnnpipe.modelio import example_inputs, save_torchscript
    from mnnpipe.models import digits_cnn
    from mnnpipe.specs import DatasetRef
    from mnnpipe.train import FitConfig, fit, seed_everything

    seed_everything(0)
    model = digits_cnn(num_classes=10, width=0.5)
    fit(model, load_dataset(DatasetRef(format="sklearn-digits", split="train", limit=512, preprocess={"channels": "GRAY"})), FitConfig(epochs=1, batch_size=64, lr=3e-3))
    path = save_torchscript(model, example_inputs([(1, 1, 8, 8)]), tmp_path_factory.mktemp("nightly-model") / "model.pt")
    s3_server.client().upload_file(str(path), bucket, "nightly-models/v1/model.pt")
    return f"s3://{bucket}/nightly-models"


def test_manual_triggers_through_cli_and_rest_api_run_every_task(nightly_registry, cluster, s3_server, bucket) -> None:
    from mnnpipe.airflow.config import path_segment

    timings = {"services up": cluster.start_seconds}
    registry = f"s3://{bucket}/models"
    deadline = time.monotonic() + RUN_TIMEOUT

    # REST: the nightly DAG, logical_date null, with a JWT from the simple auth manager
    t0 = time.monotonic()
    nightly = cluster.post(
        "/api/v2/dags/mnn_nightly_compression/dagRuns",
        {"logical_date": None, "conf": {"model_registry": nightly_registry, "distill_epochs": 1, "finetune_epochs": 1}},
    )
    assert nightly["logical_date"] is None

    # CLI, at the same time: the training hand-off, no logical date (Airflow 3's default)
    for attempt in range(4):  # the same SQLite write lock as above
        triggered = cluster.airflow("dags", "trigger", "example_training_handoff", "--conf", json.dumps({"epochs": 1, "model_registry": registry}), "--output", "json")
        if triggered.returncode == 0 or "database is locked" not in triggered.stderr:
            break
        time.sleep(2 * (attempt + 1))
    assert triggered.returncode == 0, triggered.stderr[-3000:]
    handoff = cluster.wait_for_run("example_training_handoff", deadline, run_type="manual")
    timings["handoff (CLI)"] = time.monotonic() - t0
    assert handoff["logical_date"] is None
    assert handoff["state"] == "success", cluster.task_states("example_training_handoff", handoff["dag_run_id"])
    published = cluster.xcom("example_training_handoff", handoff["dag_run_id"], "train_and_publish")
    version = published["version"]
    assert f"models/{version}/model.pt" in _keys(s3_server, bucket, "models/")

    # the hand-off's Asset event started the recompression of the version it published
    recompress = cluster.wait_for_run("mnn_recompress_on_new_model", deadline, run_type="asset_triggered")
    timings["recompress (asset)"] = time.monotonic() - t0
    assert recompress["state"] == "success", cluster.task_states("mnn_recompress_on_new_model", recompress["dag_run_id"])
    states = cluster.task_states("mnn_recompress_on_new_model", recompress["dag_run_id"])
    steps = ("version", "convert", "quantize", "benchmark", "release")
    assert states == {"versions_to_compress": "success", **{f"compress.{s}[0]": "success" for s in steps}, "trend": "success"}
    picked = cluster.xcom("mnn_recompress_on_new_model", recompress["dag_run_id"], "versions_to_compress")
    assert picked == [{"version": version, "model_uri": published["model_uri"], "name": "models"}]  # the event's extra
    for step in ("convert", "quantize", "benchmark"):
        assert f"artifacts/versions/{version}/{step}/manifest.json" in _keys(s3_server, bucket, f"artifacts/versions/{version}/")
    released = cluster.xcom("mnn_recompress_on_new_model", recompress["dag_run_id"], "compress.release", map_index=0)
    assert released["released"].startswith(f"s3://{bucket}/artifacts/released/models/{version}/")
    assert released["latest_moved"] is True
    assert "artifacts/released/models/latest.json" in _keys(s3_server, bucket, "artifacts/released/models/")
    assert _released_events(cluster, recompress["dag_run_id"]) == [version]
    assert "convert summary: " in _task_log(cluster, "mnn_recompress_on_new_model", recompress["dag_run_id"], "compress.convert")

    done = cluster.wait_for_run("mnn_nightly_compression", deadline, run_id=nightly["dag_run_id"])
    timings["nightly (REST)"] = time.monotonic() - t0
    states = cluster.task_states("mnn_nightly_compression", done["dag_run_id"])
    assert done["state"] == "success", states
    assert set(states) == {"latest_model", "distill", "prune", "convert", "quantize", "benchmark", "release", "trend"}
    assert set(states.values()) == {"success"}, states
    run_prefix = f"artifacts/nightly/{path_segment(done['dag_run_id'])}/"
    written = _keys(s3_server, bucket, run_prefix)
    for step in ("distill", "prune", "convert", "quantize", "benchmark"):
        assert f"{run_prefix}{step}/manifest.json" in written, sorted(written)
    assert _released_events(cluster, done["dag_run_id"]) == ["v1"]
    assert "artifacts/released/nightly-models/latest.json" in _keys(s3_server, bucket, "artifacts/released/nightly-models/")

    print("real Airflow timings (s):", json.dumps({k: round(v, 1) for k, v in timings.items()}))
