"""Faults, kills, concurrent runs, egress and secrets: what a reader sees is always complete.

Real parts only: the S3 server is stopped and restarted, steps run as `mnnpipe` subprocesses and
are killed with SIGKILL, MNN's converter and quantizer are traced with strace.
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
import torch

from mnnpipe.errors import StoreError
from mnnpipe.models import digits_cnn
from mnnpipe.runner import run_step
from mnnpipe.store import MANIFEST, fetch, sha256_file, store_for

pytestmark = pytest.mark.integration
MNNPIPE = [sys.executable, "-m", "mnnpipe.cli"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.manual_seed(0)
    torch.jit.trace(digits_cnn(width=0.5).eval(), torch.rand(1, 1, 8, 8)).save(str(path))
    return path


def convert_spec(model_uri: str, output: str) -> dict:
    return {"kind": "convert", "output": output, "model": {"uri": model_uri}, "inputs": [{"name": "input", "shape": [1, 1, 8, 8]}]}


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


def test_server_stopped_mid_publish_leaves_no_manifest_and_rerun_completes(s3_server, s3_bucket, tiny_model, cache_dir):
    client = s3_server.client()
    output = f"s3://{s3_bucket}/runs/convert"

    def first_artifact_uploaded() -> bool:
        try:
            keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="runs/convert/").get("Contents", [])]
        except Exception:
            return True
        return any(k.endswith((".onnx", ".mnn")) for k in keys)

    watcher = _stop_when(s3_server, first_artifact_uploaded, timeout=120)
    try:
        with pytest.raises(StoreError):
            run_step("convert", convert_spec(str(tiny_model), output))
        watcher.join()
    finally:
        s3_server.restart()
    assert assert_complete_or_absent(output) is False
    result = run_step("convert", convert_spec(str(tiny_model), output))
    assert not result.cached
    assert assert_complete_or_absent(output) is True


# --------------------------------------------------------------------------- SIGKILL


def test_sigkill_mid_publish_leaves_nothing_that_looks_finished_and_rerun_finishes(tiny_model, tmp_path, cache_dir):
    out = tmp_path / "out"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(convert_spec(str(tiny_model), str(out))))
    env = {**os.environ, "MNNPIPE_CACHE_URI": str(cache_dir)}
    proc = subprocess.Popen([*MNNPIPE, "-q", "run", "convert", "--spec", str(spec)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "model.onnx").exists() or (out / "model.mnn").exists():
            break  # publishing has begun: the data objects come before the manifest
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert assert_complete_or_absent(str(out)) is False
    rerun = subprocess.run([*MNNPIPE, "-q", "run", "convert", "--spec", str(spec)], env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert assert_complete_or_absent(str(out)) is True
    assert not (out / ".mnnpipe.lock").exists()


# --------------------------------------------------------------------------- concurrency


def test_two_runs_on_one_prefix_both_complete_or_one_refuses(tiny_model, tmp_path, cache_dir):
    out = tmp_path / "shared-out"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(convert_spec(str(tiny_model), str(out))))
    env = {**os.environ, "MNNPIPE_CACHE_URI": str(cache_dir)}
    cmd = [*MNNPIPE, "-q", "run", "convert", "--no-cache", "--spec", str(spec)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in outcomes)
    assert codes in ([0, 0], [0, 3]), outcomes
    for code, err in outcomes:
        if code == 3:
            assert "another run" in err and err.count("\n") == 1
    manifest = json.loads((out / MANIFEST).read_text())  # parses: not corrupted
    assert manifest["artifacts"]["model.mnn"]["sha256"] == sha256_file(out / "model.mnn")
    assert assert_complete_or_absent(str(out)) is True


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


def test_sentinel_secret_never_leaks(s3_server, s3_bucket, tiny_model, tmp_path, cache_dir):
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert "sentinel" in secret  # conftest sets a recognisable sentinel
    store_for(f"s3://{s3_bucket}/m").put(tiny_model, f"s3://{s3_bucket}/models/model.pt")
    env = {**os.environ, "MNNPIPE_S3_ENDPOINT_URL": s3_server.endpoint, "MNNPIPE_CACHE_URI": str(cache_dir)}
    ok_spec = tmp_path / "ok.json"
    ok_spec.write_text(json.dumps(convert_spec(f"s3://{s3_bucket}/models/model.pt", f"s3://{s3_bucket}/out/c")))
    bad_spec = tmp_path / "bad.json"
    bad_spec.write_text(json.dumps(convert_spec(f"s3://{s3_bucket}/models/absent.pt", f"s3://{s3_bucket}/out/d")))
    texts = []
    for spec in (ok_spec, bad_spec):
        for fmt in ("text", "json"):
            proc = subprocess.run([*MNNPIPE, "--log-format", fmt, "run", "convert", "--spec", str(spec), "--result", str(tmp_path / "r.json")],
                                  env=env, capture_output=True, text=True, timeout=300)
            texts += [proc.stdout, proc.stderr]
    # an unreachable endpoint: the error message names the endpoint, never the credentials
    down = subprocess.run([*MNNPIPE, "run", "convert", "--spec", str(ok_spec), "--no-cache"],
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
