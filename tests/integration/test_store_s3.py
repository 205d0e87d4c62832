"""The S3 store against real S3-compatible HTTP servers on 127.0.0.1: moto's server mode, and
SeaweedFS with authentication (two identities, bucket auto-create off), an independent one."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from mnnpipe.errors import InputError, IntegrityError, SpecError, StoreError
from mnnpipe.store import S3Settings, S3Store, fetch, sha256_file, store_for

pytestmark = pytest.mark.integration


def test_round_trip_verifies_digests(any_s3, tmp_path):
    server, bucket = any_s3
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(300_000))
    uri = f"s3://{bucket}/models/v1/model.bin"
    store = store_for(uri)
    store.put(src, uri)
    assert store.exists(uri)
    back = fetch(uri, tmp_path / "dl")
    assert sha256_file(back) == sha256_file(src)
    head = server.client().head_object(Bucket=bucket, Key="models/v1/model.bin")
    assert head["Metadata"]["sha256"] == sha256_file(src)


def test_multipart_upload_above_threshold(any_s3, tmp_path, monkeypatch):
    server, bucket = any_s3
    monkeypatch.setenv("MNNPIPE_S3_MULTIPART_THRESHOLD", str(5 << 20))
    store = S3Store(S3Settings.from_env())
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 << 20))
    uri = f"s3://{bucket}/big.bin"
    store.put(src, uri)
    etag = server.client().head_object(Bucket=bucket, Key="big.bin")["ETag"]
    assert etag.strip('"').endswith("-3")  # three 5 MiB parts: a multipart ETag
    assert sha256_file(fetch(uri, tmp_path / "dl")) == sha256_file(src)


def test_prefix_fetch_brings_a_folder(any_s3, tmp_path):
    server, bucket = any_s3
    for key in ("data/cls_a/1.png", "data/cls_b/2.png"):
        server.client().put_object(Bucket=bucket, Key=key, Body=b"img")
    root = fetch(f"s3://{bucket}/data", tmp_path)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png")) == ["cls_a/1.png", "cls_b/2.png"]


def test_prefix_with_folder_marker_keys_is_fetched(any_s3, tmp_path):
    """Consoles and some tools create zero-byte 'dir/' keys; they are not files."""
    server, bucket = any_s3
    client = server.client()
    for key, body in (("ds/", b""), ("ds/cls_a/", b""), ("ds/cls_a/1.png", b"img"), ("ds/cls_b/2.png", b"img")):
        client.put_object(Bucket=bucket, Key=key, Body=body)
    root = fetch(f"s3://{bucket}/ds", tmp_path)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == ["cls_a/1.png", "cls_b/2.png"]


def test_missing_object_and_bucket_are_input_errors(any_s3, tmp_path):
    _, bucket = any_s3
    with pytest.raises(InputError, match="no such object"):
        fetch(f"s3://{bucket}/absent.pt", tmp_path)
    with pytest.raises(InputError):
        store_for("s3://no-such-bucket-here/x").read_bytes("s3://no-such-bucket-here/x")


def test_tampered_object_fails_verification(any_s3, tmp_path):
    server, bucket = any_s3
    store = store_for(f"s3://{bucket}/o")
    src = tmp_path / "m.bin"
    src.write_bytes(b"good")
    store.put(src, f"s3://{bucket}/out/m.bin")
    manifest = {"artifacts": {"m.bin": {"uri": f"s3://{bucket}/out/m.bin", "sha256": sha256_file(src), "size": 4}}}
    store.write_bytes(json.dumps(manifest).encode(), f"s3://{bucket}/out/manifest.json")
    server.client().put_object(Bucket=bucket, Key="out/m.bin", Body=b"evil")
    with pytest.raises(IntegrityError):
        fetch(f"s3://{bucket}/out/m.bin", tmp_path / "dl")


def test_corrupt_manifest_refuses_the_artifact_beside_it(any_s3, tmp_path):
    server, bucket = any_s3
    client = server.client()
    client.put_object(Bucket=bucket, Key="out/m.bin", Body=b"evil")
    client.put_object(Bucket=bucket, Key="out/manifest.json", Body=b'{"artifacts": {"m.bin": {"uri": "s3://')  # truncated
    with pytest.raises(IntegrityError, match="manifest is unreadable"):
        fetch(f"s3://{bucket}/out/m.bin", tmp_path / "dl")


def test_conditional_write_has_one_winner(any_s3):
    _, bucket = any_s3
    store = store_for(f"s3://{bucket}/p")
    uri = f"s3://{bucket}/released/latest.json"
    assert store.write_bytes(b"a", uri, if_absent=True) is True
    assert store.write_bytes(b"b", uri, if_absent=True) is False
    assert store.read_bytes(uri) == b"a"


def test_swap_is_a_compare_and_swap(any_s3):
    _, bucket = any_s3
    store = store_for(f"s3://{bucket}/p")
    uri = f"s3://{bucket}/lock"
    store.write_bytes(b"old", uri)
    assert store.swap(uri, lambda cur: b"mine" if cur == b"old" else None) == b"mine"
    assert store.swap(uri, lambda cur: b"again" if cur == b"old" else None) is None
    assert store.read_bytes(uri) == b"mine"


def test_unreachable_endpoint_is_store_error_without_secrets(monkeypatch, tmp_path):
    from mnnpipe import store as store_mod

    monkeypatch.setenv("MNNPIPE_S3_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("MNNPIPE_S3_MAX_ATTEMPTS", "1")
    store_mod._s3_store.cache_clear()
    with pytest.raises(StoreError) as info:
        store_for("s3://bucket-x/m.pt").read_bytes("s3://bucket-x/m.pt")
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in str(info.value)
    assert "bucket-x/m.pt" in str(info.value)
    store_mod._s3_store.cache_clear()


def test_connection_torn_down_mid_transfer_is_one_clear_line(any_s3):
    """urllib3 reports a socket closed under a stalled upload as AttributeError: 'NoneType'...;
    that is what the review saw as the whole error line."""
    store = store_for(f"s3://{any_s3[1]}/x")
    err = store._fail("upload", f"s3://{any_s3[1]}/out/model.mnn", AttributeError("'NoneType' object has no attribute 'sendall'"))
    assert isinstance(err, StoreError)
    assert "NoneType" not in str(err) and "stalled or was closed mid-transfer" in str(err) and "out/model.mnn" in str(err)


# --------------------------------------------------------------------------- authentication (SeaweedFS)


def _run_cli(args: list[str], env: dict, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mnnpipe.cli", *args], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)


def _convert_spec(tmp_path, model_uri: str, output: str):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"kind": "convert", "output": output, "model": {"uri": model_uri}, "inputs": [{"name": "input", "shape": [1, 1, 8, 8]}]}))
    return spec


def test_wrong_secret_is_refused_by_seaweedfs_with_exit_3_and_no_secret(seaweed_server, tmp_path):
    bucket = f"t-auth-{os.getpid()}"
    seaweed_server.client().create_bucket(Bucket=bucket)
    seaweed_server.client().put_object(Bucket=bucket, Key="models/m.pt", Body=b"not read")
    wrong = "wrong-secret-sentinel-value"
    env = {**os.environ, "MNNPIPE_S3_ENDPOINT_URL": seaweed_server.endpoint, "AWS_SECRET_ACCESS_KEY": wrong, "MNNPIPE_S3_MAX_ATTEMPTS": "1"}
    spec = _convert_spec(tmp_path, f"s3://{bucket}/models/m.pt", f"s3://{bucket}/out")
    proc = _run_cli(["run", "convert", "--spec", str(spec)], env, tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "SignatureDoesNotMatch" in proc.stderr or "Forbidden" in proc.stderr or "403" in proc.stderr, proc.stderr
    assert wrong not in proc.stderr + proc.stdout
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in proc.stderr + proc.stdout


def test_read_only_identity_cannot_publish(seaweed_server, tmp_path, monkeypatch):
    from mnnpipe import store as store_mod

    bucket = f"t-ro-{os.getpid()}"
    seaweed_server.client().create_bucket(Bucket=bucket)
    monkeypatch.setenv("MNNPIPE_S3_ENDPOINT_URL", seaweed_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed_server.READER[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed_server.READER[1])
    monkeypatch.setenv("MNNPIPE_S3_MAX_ATTEMPTS", "1")
    store_mod._s3_store.cache_clear()
    try:
        with pytest.raises(StoreError, match="AccessDenied") as info:
            store_for(f"s3://{bucket}/x").write_bytes(b"x", f"s3://{bucket}/x")
        assert seaweed_server.READER[1] not in str(info.value)
    finally:
        store_mod._s3_store.cache_clear()


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("name", "value"),
    [("MNNPIPE_S3_MAX_ATTEMPTS", "abc"), ("MNNPIPE_S3_MAX_ATTEMPTS", "0"), ("MNNPIPE_S3_READ_TIMEOUT", "nan"),
     ("MNNPIPE_S3_CONNECT_TIMEOUT", "-1"), ("MNNPIPE_S3_ADDRESSING_STYLE", "bogus"), ("MNNPIPE_S3_ENDPOINT_URL", "127.0.0.1:9000")],
)
def test_invalid_s3_settings_are_bad_input_naming_the_variable(name, value, monkeypatch):
    monkeypatch.setenv(name, value)
    with pytest.raises(SpecError, match=name) as info:
        S3Settings.from_env()
    assert "\n" not in str(info.value)


def test_invalid_s3_setting_exits_2_with_one_line(tmp_path):
    spec = _convert_spec(tmp_path, "s3://bucket-x/m.pt", str(tmp_path / "out"))
    proc = _run_cli(["run", "convert", "--spec", str(spec)], {**os.environ, "MNNPIPE_S3_MAX_ATTEMPTS": "abc"}, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "MNNPIPE_S3_MAX_ATTEMPTS" in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr


# --------------------------------------------------------------------------- stalls (SeaweedFS paused with SIGSTOP)


def _pause_when(server, predicate, timeout=60.0) -> threading.Thread:
    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not predicate():
            time.sleep(0.002)
        os.kill(server.proc.pid, signal.SIGSTOP)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def stall_settings(seaweed_server, monkeypatch):
    from mnnpipe import store as store_mod

    monkeypatch.setenv("MNNPIPE_S3_ENDPOINT_URL", seaweed_server.endpoint)
    monkeypatch.setenv("MNNPIPE_S3_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("MNNPIPE_S3_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("MNNPIPE_S3_READ_TIMEOUT", "2")
    monkeypatch.setenv("MNNPIPE_S3_MULTIPART_THRESHOLD", str(5 << 20))
    store_mod._s3_store.cache_clear()
    bucket = f"t-stall-{os.urandom(4).hex()}"
    seaweed_server.client().create_bucket(Bucket=bucket)
    yield bucket
    os.kill(seaweed_server.proc.pid, signal.SIGCONT)
    store_mod._s3_store.cache_clear()


# At MAX_ATTEMPTS=2, CONNECT_TIMEOUT=1, READ_TIMEOUT=2 one request gives up after at most
# 2 x (1 + 2 + 1 s waiting for "100 Continue" on uploads) plus one backoff (< 1 s): 9 s.
# README's S3 table states the formula.
WORST_CASE_S = 2 * (1 + 2 + 1) + 1


def test_stalled_download_gives_up_within_the_configured_bound(seaweed_server, stall_settings, tmp_path):
    bucket = stall_settings
    seaweed_server.client().put_object(Bucket=bucket, Key="big.bin", Body=os.urandom(48 << 20))
    dest = tmp_path / "dl"
    watcher = _pause_when(seaweed_server, lambda: any(p.stat().st_size > 0 for p in dest.rglob(".big.bin.part-*")))
    t0 = time.monotonic()
    with pytest.raises(StoreError, match="download failed") as info:
        fetch(f"s3://{bucket}/big.bin", dest)
    elapsed = time.monotonic() - t0
    watcher.join()
    assert "NoneType" not in str(info.value)
    # Parallel ranged GETs each wait out their own request bound: measured 4.6-10.8 s here,
    # 39 s before s3transfer's own download attempts stopped multiplying botocore's.
    assert elapsed < 2 * WORST_CASE_S, f"a stalled download took {elapsed:.1f} s; the settings allow about {WORST_CASE_S} s"
    assert not [p for p in dest.rglob("*") if p.is_file()], "a partial download was left behind"


def test_stalled_multipart_upload_says_what_failed_and_the_rerun_completes(seaweed_server, stall_settings, tmp_path):
    bucket = stall_settings
    client = seaweed_server.client()
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 << 20))
    uri = f"s3://{bucket}/out/big.bin"

    def upload_started() -> bool:
        try:
            return bool(client.list_multipart_uploads(Bucket=bucket).get("Uploads"))
        except Exception:
            return True

    watcher = _pause_when(seaweed_server, upload_started)
    t0 = time.monotonic()
    with pytest.raises(StoreError, match="upload failed") as info:
        store_for(uri).put(src, uri)
    elapsed = time.monotonic() - t0
    watcher.join()
    os.kill(seaweed_server.proc.pid, signal.SIGCONT)
    message = str(info.value)
    assert "NoneType" not in message and "\n" not in message, message
    assert "out/big.bin" in message
    assert elapsed < 3 * WORST_CASE_S, f"a stalled upload took {elapsed:.1f} s"
    # The rerun completes, and no unfinished multipart upload is left billed on the server.
    store_for(uri).put(src, uri)
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert sha256_file(fetch(uri, tmp_path / "dl")) == sha256_file(src)
