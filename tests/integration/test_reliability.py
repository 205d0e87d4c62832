"""Faults, kills, concurrent runs, egress and secrets: what a reader sees is always complete.

Real parts only: the S3 server is stopped and restarted, steps run as `mnnpipe` subprocesses and
are killed with SIGKILL, MNN's converter and quantizer are traced with strace. Where the runner and
the store are the subject (publishing, killing, secrets), the step is the fake `echo` step
(tests/support/echo_step.py; fixture `echo_step`): milliseconds of work, and `padding_bytes`
makes a second artifact to publish after echo.mnn, a window to stop a run in.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mnnpipe.errors import StoreError
from mnnpipe.runner import run_step
from mnnpipe.store import MANIFEST, fetch, sha256_file, store_for

pytestmark = pytest.mark.integration
MNNPIPE = [sys.executable, "-m", "mnnpipe.cli"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    import torch

    from mnnpipe.models import digits_cnn

    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.manual_seed(0)
    torch.jit.trace(digits_cnn(width=0.5).eval(), torch.rand(1, 1, 8, 8)).save(str(path))
    return path


def convert_spec(model_uri: str, output: str) -> dict:
    return {"kind": "convert", "output": output, "model": {"uri": model_uri}, "inputs": [{"name": "input", "shape": [1, 1, 8, 8]}]}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """The echo step's input: any bytes (it copies them)."""
    path = tmp_path_factory.mktemp("model") / "model.pt"
    path.write_bytes(os.urandom(4096))
    return path


def echo_spec(model_uri: str, output: str, **extra) -> dict:
    return {"kind": "echo", "output": output, "model": {"uri": model_uri}, **extra}


def assert_complete_or_absent(output: str) -> bool:
    """An output either has no manifest, or every artifact its manifest lists verifies."""
    store = store_for(output)
    manifest_uri = f"{output.rstrip('/')}/{MANIFEST}"
    if not store.exists(manifest_uri):
        return False
    manifest = json.loads(store.read_bytes(manifest_uri))
    for art in manifest["artifacts"].values():
        fetch(art["uri"], Path(os.environ["XDG_CACHE_HOME"]) / "verify")  # verifies sha256 + size
    return True


# --------------------------------------------------------------------------- S3 faults


def _stop_when(server, predicate, timeout=60.0):
    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not predicate():
            time.sleep(0.005)
        server.stop()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_server_stopped_mid_download_then_rerun_completes(s3_server, s3_bucket, tmp_path):
    client = s3_server.client()
    payload = os.urandom(96 << 20)
    client.put_object(Bucket=s3_bucket, Key="big.bin", Body=payload)
    dest = tmp_path / "dl"
    watcher = _stop_when(s3_server, lambda: bool(glob.glob(f"{dest}/**/.big.bin.part-*", recursive=True)))
    try:
        with pytest.raises(StoreError, match="download failed"):
            fetch(f"s3://{s3_bucket}/big.bin", dest)
        watcher.join()
        assert not [p for p in dest.rglob("*") if p.is_file()], "a partial download was left behind"
    finally:
        s3_server.restart()
    got = fetch(f"s3://{s3_bucket}/big.bin", tmp_path / "dl2")
    assert got.stat().st_size == len(payload)


def test_server_stopped_mid_publish_leaves_no_manifest_and_rerun_completes(echo_step, s3_server, s3_bucket, model_file, cache_dir):
    client = s3_server.client()
    output = f"s3://{s3_bucket}/runs/echo"
    spec = echo_spec(str(model_file), output, padding_bytes=64 << 20)  # pad.bin is published after echo.mnn

    def first_artifact_uploaded() -> bool:
        try:
            keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="runs/echo/").get("Contents", [])]
        except Exception:
            return True
        return any(k.endswith(".mnn") for k in keys)

    watcher = _stop_when(s3_server, first_artifact_uploaded, timeout=120)
    try:
        with pytest.raises(StoreError):
            run_step("echo", spec)
        watcher.join()
    finally:
        s3_server.restart()
    assert assert_complete_or_absent(output) is False
    result = run_step("echo", spec)
    assert not result.cached
    assert assert_complete_or_absent(output) is True


def test_multipart_upload_cut_off_by_a_stopped_server_leaves_no_orphan_after_the_rerun(s3_server, s3_bucket, tmp_path, monkeypatch):
    """The server goes away mid-upload, so nobody can abort then; the rerun cleans up."""
    from mnnpipe import store as store_mod

    monkeypatch.setenv("MNNPIPE_S3_MULTIPART_THRESHOLD", str(5 << 20))
    store_mod._s3_store.cache_clear()
    client = s3_server.client()
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(40 << 20))
    uri = f"s3://{s3_bucket}/out/big.bin"

    def upload_started() -> bool:
        try:
            return bool(client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads"))
        except Exception:
            return True

    watcher = _stop_when(s3_server, upload_started)
    try:
        with pytest.raises(StoreError, match="upload failed") as info:
            store_for(uri).put(src, uri)
        assert "NoneType" not in str(info.value) and "out/big.bin" in str(info.value)
        watcher.join()
    finally:
        s3_server.restart()
    store_for(uri).put(src, uri)
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert sha256_file(fetch(uri, tmp_path / "dl")) == sha256_file(src)


# --------------------------------------------------------------------------- SIGKILL


def test_sigkill_mid_publish_leaves_nothing_that_looks_finished_and_rerun_finishes(echo_step, model_file, tmp_path, cache_dir):
    out = tmp_path / "out"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(echo_spec(str(model_file), str(out), padding_bytes=128 << 20)))  # pad.bin after echo.mnn
    env = {**os.environ, "MNNPIPE_CACHE_URI": str(cache_dir)}
    proc = subprocess.Popen([*MNNPIPE, "-q", "run", "echo", "--spec", str(spec)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "echo.mnn").exists():
            break  # publishing has begun: the data objects come before the manifest
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert assert_complete_or_absent(str(out)) is False
    rerun = subprocess.run([*MNNPIPE, "-q", "run", "echo", "--spec", str(spec)], env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert assert_complete_or_absent(str(out)) is True
    assert not (out / ".mnnpipe.lock").exists()


# --------------------------------------------------------------------------- concurrency


# Each holder appends "start" and "end" lines while inside the lock; contenders start together.
_HOLDER = """
import sys, time
from mnnpipe.errors import StoreError
from mnnpipe.store import OutputLock
output, record, start_at = sys.argv[1], sys.argv[2], float(sys.argv[3])
lock = OutputLock(output)
lock._holder()  # the client connected and warmed up before the race starts: all contend at once
while time.time() < start_at:
    time.sleep(0.001)
try:
    with lock:
        with open(record, "a") as f:
            f.write(f"start {time.time()!r}\\n")
        time.sleep(0.3)
        with open(record, "a") as f:
            f.write(f"end {time.time()!r}\\n")
except StoreError as e:
    print(e, file=sys.stderr)
    sys.exit(3)
"""


@pytest.fixture(params=["local", "moto", "seaweedfs"])
def lock_output(request, s3_bucket_on, tmp_path):
    if request.param == "local":
        return str(tmp_path / "shared-out")
    return f"s3://{s3_bucket_on(request.param)[1]}/shared-out"


def test_output_lock_never_has_two_holders_even_when_taking_over_a_stale_lock(lock_output, tmp_path):
    """8 runs race for one output whose lock was left by a run long gone (past the TTL)."""
    import socket

    stale = json.dumps({"host": socket.gethostname(), "pid": 1, "since": 0, "id": "left-by-a-killed-run"}).encode()
    store_for(lock_output).write_bytes(stale, f"{lock_output}/.mnnpipe.lock")
    record = tmp_path / "intervals.txt"
    start_at = time.time() + 3.0
    procs = [
        subprocess.Popen([sys.executable, "-c", _HOLDER, lock_output, str(record), str(start_at)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        for _ in range(8)
    ]
    outcomes = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    for code, err in outcomes:
        assert code in (0, 3), err
        if code == 3:
            assert "another run" in err and err.count("\n") == 1, err
    events = [line.split() for line in record.read_text().splitlines()]
    intervals = [(float(a[1]), float(b[1])) for a, b in zip(events[::2], events[1::2])]
    assert events and all(a[0] == "start" and b[0] == "end" for a, b in zip(events[::2], events[1::2])), f"two holders at once: {events}"
    assert len(intervals) == sum(code == 0 for code, _ in outcomes)
    assert not store_for(lock_output).exists(f"{lock_output}/.mnnpipe.lock")  # the last holder released it


# --------------------------------------------------------------------------- egress


def _connect_targets(strace_log: Path) -> list[str]:
    """Every AF_INET/AF_INET6 connect() any traced process attempted, as 'ip:port'."""
    targets = []
    for line in strace_log.read_text().splitlines():
        if "connect(" not in line or "AF_INET" not in line:
            continue
        port = re.search(r"sin6?_port=htons\((\d+)\)", line)
        addr = re.search(r'inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, "([^"]+)"', line)
        targets.append(f"{(addr.group(1) or addr.group(2)) if addr else '?'}:{port.group(1) if port else '?'}")
    return targets


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_no_step_connects_anywhere_but_the_configured_s3_endpoint(s3_server, s3_bucket, tiny_model, tmp_path, cache_dir):
    """convert (MNN's converter) then quantize (MNN's quantizer), every process traced."""
    store_for(f"s3://{s3_bucket}/m").put(tiny_model, f"s3://{s3_bucket}/models/model.pt")
    conv = tmp_path / "convert.json"
    conv.write_text(json.dumps(convert_spec(f"s3://{s3_bucket}/models/model.pt", f"s3://{s3_bucket}/out/convert")))
    env = {**os.environ, "MNNPIPE_S3_ENDPOINT_URL": s3_server.endpoint, "MNNPIPE_CACHE_URI": str(cache_dir)}
    logs = []
    qpath = tmp_path / "quantize.json"
    qpath.write_text(json.dumps(_quantize_spec(f"s3://{s3_bucket}/out/convert/model.mnn", f"s3://{s3_bucket}/out/quantize")))
    runs = [["run", "convert", "--spec", str(conv)], ["run", "quantize", "--spec", str(qpath)]]
    for i, args in enumerate(runs):
        log = tmp_path / f"strace-{i}.log"
        proc = subprocess.run(
            ["strace", "-f", "-qq", "-e", "trace=connect", "-o", str(log), *MNNPIPE, "-q", *args],
            env=env, capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        logs.append(log)
    targets = [t for log in logs for t in _connect_targets(log)]
    allowed = {f"127.0.0.1:{s3_server.port}"}
    assert targets, "strace saw no connection at all: the S3 endpoint was never contacted, so the trace proves nothing"
    assert set(targets) <= allowed, f"unexpected connections: {sorted(set(targets) - allowed)}"


def _quantize_spec(model_uri: str, output: str) -> dict:
    digits = {"format": "sklearn-digits", "preprocess": {"channels": "GRAY"}}
    return {
        "kind": "quantize",
        "output": output,
        "model": {"uri": model_uri},
        "input": {"name": "input", "shape": [1, 1, 8, 8]},
        "calibration": {**digits, "split": "train", "limit": 32},
        "calibration_samples": 32,
        "evaluation": {**digits, "split": "test", "limit": 64},
        "max_accuracy_drop": 100.0,  # an untrained model: this test is about sockets, not accuracy
    }


# --------------------------------------------------------------------------- secrets


def test_sentinel_secret_never_leaks(echo_step, s3_server, s3_bucket, model_file, tmp_path, cache_dir):
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert "sentinel" in secret  # conftest sets a recognisable sentinel
    store_for(f"s3://{s3_bucket}/m").put(model_file, f"s3://{s3_bucket}/models/model.pt")
    env = {**os.environ, "MNNPIPE_S3_ENDPOINT_URL": s3_server.endpoint, "MNNPIPE_CACHE_URI": str(cache_dir)}
    ok_spec = tmp_path / "ok.json"
    ok_spec.write_text(json.dumps(echo_spec(f"s3://{s3_bucket}/models/model.pt", f"s3://{s3_bucket}/out/c")))
    bad_spec = tmp_path / "bad.json"
    bad_spec.write_text(json.dumps(echo_spec(f"s3://{s3_bucket}/models/absent.pt", f"s3://{s3_bucket}/out/d")))
    texts = []
    for spec in (ok_spec, bad_spec):
        for fmt in ("text", "json"):
            proc = subprocess.run([*MNNPIPE, "--log-format", fmt, "run", "echo", "--spec", str(spec), "--result", str(tmp_path / "r.json")],
                                  env=env, capture_output=True, text=True, timeout=300)
            texts += [proc.stdout, proc.stderr]
    # an unreachable endpoint: the error message names the endpoint, never the credentials
    down = subprocess.run([*MNNPIPE, "run", "echo", "--spec", str(ok_spec), "--no-cache"],
                          env={**env, "MNNPIPE_S3_ENDPOINT_URL": "http://127.0.0.1:9", "MNNPIPE_S3_MAX_ATTEMPTS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert down.returncode == 3
    texts += [down.stdout, down.stderr, (tmp_path / "r.json").read_text()]
    client = s3_server.client()
    for obj in client.list_objects_v2(Bucket=s3_bucket).get("Contents", []):
        if obj["Key"].endswith(".json"):
            texts.append(client.get_object(Bucket=s3_bucket, Key=obj["Key"])["Body"].read().decode())
    assert any("manifest" in t or "sha256" in t for t in texts)
    for text in texts:
        assert secret not in text
        assert os.environ["AWS_ACCESS_KEY_ID"] not in text
