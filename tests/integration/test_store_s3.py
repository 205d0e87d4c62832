"""The S3 store against a real S3-compatible HTTP server (moto's server mode on 127.0.0.1)."""

import os

import pytest

from mnnpipe.errors import InputError, IntegrityError, StoreError
from mnnpipe.store import S3Settings, S3Store, fetch, sha256_file, store_for

pytestmark = pytest.mark.integration


def test_round_trip_verifies_digests(s3_bucket, tmp_path):
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(300_000))
    uri = f"s3://{s3_bucket}/models/v1/model.bin"
    store = store_for(uri)
    store.put(src, uri)
    assert store.exists(uri)
    back = fetch(uri, tmp_path / "dl")
    assert sha256_file(back) == sha256_file(src)
    head = store.client.head_object(Bucket=s3_bucket, Key="models/v1/model.bin")
    assert head["Metadata"]["sha256"] == sha256_file(src)


def test_multipart_upload_above_threshold(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("MNNPIPE_S3_MULTIPART_THRESHOLD", str(5 << 20))
    store = S3Store(S3Settings.from_env())
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 << 20))
    uri = f"s3://{s3_bucket}/big.bin"
    store.put(src, uri)
    etag = store.client.head_object(Bucket=s3_bucket, Key="big.bin")["ETag"]
    assert etag.strip('"').endswith("-3")  # three 5 MiB parts: a multipart ETag
    assert sha256_file(fetch(uri, tmp_path / "dl")) == sha256_file(src)


def test_prefix_fetch_brings_a_folder(s3_bucket, tmp_path):
    client = store_for(f"s3://{s3_bucket}/x").client
    for key in ("data/cls_a/1.png", "data/cls_b/2.png"):
        client.put_object(Bucket=s3_bucket, Key=key, Body=b"img")
    root = fetch(f"s3://{s3_bucket}/data", tmp_path)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png")) == ["cls_a/1.png", "cls_b/2.png"]


def test_missing_object_and_bucket_are_input_errors(s3_bucket, tmp_path):
    with pytest.raises(InputError, match="no such object"):
        fetch(f"s3://{s3_bucket}/absent.pt", tmp_path)
    with pytest.raises(InputError):
        store_for("s3://no-such-bucket-here/x").read_bytes("s3://no-such-bucket-here/x")


def test_tampered_object_fails_verification(s3_bucket, tmp_path):
    import json

    store = store_for(f"s3://{s3_bucket}/o")
    src = tmp_path / "m.bin"
    src.write_bytes(b"good")
    store.put(src, f"s3://{s3_bucket}/out/m.bin")
    manifest = {"artifacts": {"m.bin": {"uri": f"s3://{s3_bucket}/out/m.bin", "sha256": sha256_file(src), "size": 4}}}
    store.write_bytes(json.dumps(manifest).encode(), f"s3://{s3_bucket}/out/manifest.json")
    store.client.put_object(Bucket=s3_bucket, Key="out/m.bin", Body=b"evil")
    with pytest.raises(IntegrityError):
        fetch(f"s3://{s3_bucket}/out/m.bin", tmp_path / "dl")


def test_conditional_write_has_one_winner(s3_bucket):
    store = store_for(f"s3://{s3_bucket}/p")
    uri = f"s3://{s3_bucket}/released/latest.json"
    assert store.write_bytes(b"a", uri, if_absent=True) is True
    assert store.write_bytes(b"b", uri, if_absent=True) is False
    assert store.read_bytes(uri) == b"a"


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
