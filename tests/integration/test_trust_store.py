"""Verification fails closed: a cache hit checks every artifact's bytes and restores what is
missing; a corrupt manifest vouches for nothing; every spelling of a local path is checked; the
cache index after the commit point is best-effort. Against the local store, moto and SeaweedFS.

The step is the fake `echo` step (tests/support/echo_step.py, fixture `echo_step`: one model
input, one artifact, milliseconds) run by the real runner: `publish` and `_cached` are the
mechanism under test, and a real conversion would only add time."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from mnnpipe.errors import InputError, IntegrityError
from mnnpipe.runner import run_step
from mnnpipe.specs import StepResult
from mnnpipe.store import MANIFEST, RESULT, fetch, join, local_path, store_for

pytestmark = pytest.mark.integration


@pytest.fixture(params=["local", "moto", "seaweedfs"])
def root(request, echo_step, s3_bucket_on, tmp_path, cache_dir):
    if request.param == "local":
        return str(tmp_path / "store")
    return f"s3://{s3_bucket_on(request.param)[1]}"


def run_fake(root: str, output: str, tmp_path: Path, payload: bytes = b"mnn model bytes") -> tuple[dict, str, StepResult]:
    """run_step of the echo step, whose work is writing its model's bytes (`payload`) to echo.mnn."""
    model_uri = join(root, "registry", "m.onnx")
    if not store_for(model_uri).exists(model_uri):
        raw_write(model_uri, payload)
    spec = {"output": output, "model": {"uri": model_uri}}
    result = run_step("echo", spec)
    return spec, result.cache_key, result


def raw_read(uri: str) -> bytes:
    return store_for(uri).read_bytes(uri)


def raw_write(uri: str, data: bytes) -> None:
    store_for(uri).write_bytes(data, uri)


def test_flipped_byte_in_a_published_artifact_is_not_served_from_cache(root, tmp_path):
    output = join(root, "runs", "a")
    _, _, first = run_fake(root, output, tmp_path)
    assert not first.cached
    mnn = join(output, "echo.mnn")
    data = bytearray(raw_read(mnn))
    data[3] ^= 0x01
    raw_write(mnn, bytes(data))
    _, _, again = run_fake(root, output, tmp_path)
    assert not again.cached  # a miss: the step ran and republished
    assert raw_read(mnn) == b"mnn model bytes"
    manifest = json.loads(raw_read(join(output, MANIFEST)))
    assert manifest["artifacts"]["echo.mnn"]["size"] == len(b"mnn model bytes")


def test_deleted_result_json_is_restored_on_a_cache_hit(root, tmp_path):
    output = join(root, "runs", "b")
    _, _, first = run_fake(root, output, tmp_path)
    recorded = json.loads(raw_read(join(output, RESULT)))
    store_for(output).delete(join(output, RESULT))
    _, _, again = run_fake(root, output, tmp_path)
    assert again.cached
    assert json.loads(raw_read(join(output, RESULT))) == recorded


def test_same_work_under_a_new_prefix_copies_verified_bytes(root, tmp_path):
    run_fake(root, join(root, "runs", "2026-11-29"), tmp_path)
    _, _, today = run_fake(root, join(root, "runs", "2026-11-30"), tmp_path)
    assert today.cached
    assert raw_read(join(root, "runs", "2026-11-30", "echo.mnn")) == b"mnn model bytes"
    manifest = json.loads(raw_read(join(root, "runs", "2026-11-30", MANIFEST)))
    assert manifest["cached_from"] == join(root, "runs", "2026-11-29")


def test_tampered_earlier_output_is_recomputed_not_copied(root, tmp_path):
    run_fake(root, join(root, "runs", "old"), tmp_path)
    raw_write(join(root, "runs", "old", "echo.mnn"), b"EVL model bytes")
    _, _, fresh = run_fake(root, join(root, "runs", "new"), tmp_path)
    assert not fresh.cached
    assert raw_read(join(root, "runs", "new", "echo.mnn")) == b"mnn model bytes"


def test_corrupt_manifest_means_not_published(root, tmp_path):
    output = join(root, "runs", "c")
    run_fake(root, output, tmp_path)
    raw_write(join(output, "echo.mnn"), b"EVL model bytes")
    manifest = raw_read(join(output, MANIFEST))
    raw_write(join(output, MANIFEST), manifest[: len(manifest) // 2])  # truncated
    with pytest.raises(IntegrityError, match="manifest is unreadable"):
        fetch(join(output, "echo.mnn"), tmp_path / "dl")
    _, _, again = run_fake(root, output, tmp_path)
    assert not again.cached  # never served from a manifest that cannot be read
    assert raw_read(join(output, "echo.mnn")) == b"mnn model bytes"


def test_cache_index_failure_after_the_manifest_is_a_warning(root, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the index folder should be")
    monkeypatch.setenv("MNNPIPE_CACHE_URI", str(blocker / "index"))
    output = join(root, "runs", "d")
    with caplog.at_level(logging.WARNING, logger="mnnpipe"):
        _, _, result = run_fake(root, output, tmp_path)
    assert result.output == output.rstrip("/")
    assert json.loads(raw_read(join(output, MANIFEST)))["artifacts"]["echo.mnn"]["size"] > 0
    assert any("cache index" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- local path spellings


@pytest.fixture
def published(echo_step, tmp_path, cache_dir) -> Path:
    out = tmp_path / "pub"
    run_fake(str(tmp_path / "store"), str(out), tmp_path)
    (out / "echo.mnn").write_bytes(b"EVL model bytes")  # same size, other bytes
    return out


@pytest.mark.parametrize("spell", [
    lambda p: str(p), lambda p: f"file://{p}", lambda p: f"file://localhost{p}", lambda p: f"/{p}",
    lambda p: str(p).replace("/pub/", "/./pub/"), lambda p: str(p).replace("/pub/", "//pub/"),
], ids=["plain", "file", "file-localhost", "double-slash", "dot-segment", "inner-double-slash"])
def test_every_spelling_of_a_local_artifact_is_verified(published, spell, tmp_path):
    with pytest.raises(IntegrityError, match="sha256"):
        fetch(spell(published / "echo.mnn"), tmp_path / "dl")


def test_relative_spelling_is_verified(published, tmp_path, monkeypatch):
    monkeypatch.chdir(published.parent)
    with pytest.raises(IntegrityError, match="sha256"):
        fetch("pub/echo.mnn", tmp_path / "dl")


def test_file_uri_with_a_host_is_not_a_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "host").mkdir()
    (tmp_path / "host" / "m.onnx").write_bytes(b"would be read as ./host/m.onnx")
    with pytest.raises(InputError, match="names host 'host'"):
        local_path("file://host/m.onnx")
    assert local_path("file:///abs/m.onnx") == Path("/abs/m.onnx")
    assert local_path("file://localhost/abs/m.onnx") == Path("/abs/m.onnx")


def test_validate_rejects_file_host_and_odd_s3_keys_with_exit_2(tmp_path):
    for uri, needle in [("file://fileserver/models/m.pt", "names host 'fileserver'"),
                        ("s3://bucket-x/models/./m.pt", "segments"), ("s3://bucket-x/models//m.pt", "segments")]:
        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps({"kind": "convert", "output": str(tmp_path / "o"), "model": {"uri": uri},
                                    "inputs": [{"name": "input", "shape": [1, 1, 8, 8]}]}))
        proc = subprocess.run([sys.executable, "-m", "mnnpipe.cli", "validate", "convert", "--spec", str(spec)],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert proc.returncode == 2, (uri, proc.stderr)
        assert needle in proc.stderr and proc.stderr.strip().count("\n") == 0, (uri, proc.stderr)
