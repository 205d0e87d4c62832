"""The container entrypoint end to end: `mnnpipe run` as a process, its exit codes, the result
JSON, the manifest's lineage and the content-addressed cache, on local folders and on S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mnnpipe.models import digits_cnn
from mnnpipe import catalog

STEP_NAMES = catalog.names()
from mnnpipe.store import sha256_file, store_for

pytestmark = pytest.mark.integration
MNNPIPE = [sys.executable, "-m", "mnnpipe.cli"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("m") / "model.pt"
    torch.manual_seed(1)
    torch.jit.trace(digits_cnn(width=0.5).eval(), torch.rand(1, 1, 8, 8)).save(str(path))
    return path


def mnnpipe(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*MNNPIPE, *args], capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def write_spec(path: Path, model_uri: str, output: str) -> Path:
    path.write_text(f"output: {output}\nmodel: {{uri: '{model_uri}'}}\ninputs: [{{name: input, shape: [1, 1, 8, 8]}}]\n")
    return path


def test_second_identical_run_is_served_from_cache(model_file, tmp_path, cache_dir):
    spec = write_spec(tmp_path / "convert.yaml", str(model_file), str(tmp_path / "out"))
    env = {"MNNPIPE_CACHE_URI": str(cache_dir)}
    first = mnnpipe("-q", "run", "convert", "--spec", str(spec), "--result", str(tmp_path / "r1.json"), env=env)
    assert first.returncode == 0, first.stderr
    r1 = json.loads(first.stdout)  # stdout is exactly the result JSON
    assert r1 == json.loads((tmp_path / "r1.json").read_text())
    assert r1["cached"] is False
    mnn = r1["artifacts"]["model.mnn"]
    assert mnn["sha256"] == sha256_file(tmp_path / "out" / "model.mnn") and mnn["size"] > 0

    second = mnnpipe("-q", "run", "convert", "--spec", str(spec), env=env)
    assert second.returncode == 0, second.stderr
    r2 = json.loads(second.stdout)
    assert r2["cached"] is True and r2["cache_key"] == r1["cache_key"]
    assert r2["artifacts"]["model.mnn"]["sha256"] == mnn["sha256"]

    # Same work, another output prefix: served from the cache, copied and verified there.
    third = mnnpipe("-q", "run", "convert", "--spec", str(spec), "--set", f"output={tmp_path / 'elsewhere'}", env=env)
    r3 = json.loads(third.stdout)
    assert r3["cached"] is True
    assert sha256_file(tmp_path / "elsewhere" / "model.mnn") == mnn["sha256"]
    assert json.loads((tmp_path / "elsewhere" / "manifest.json").read_text())["cached_from"] == str(tmp_path / "out")

    forced = mnnpipe("-q", "run", "convert", "--spec", str(spec), "--no-cache", env=env)
    assert json.loads(forced.stdout)["cached"] is False


def test_changed_input_bytes_miss_the_cache(model_file, tmp_path, cache_dir):
    model = tmp_path / "model.pt"
    model.write_bytes(model_file.read_bytes())
    spec = write_spec(tmp_path / "c.yaml", str(model), str(tmp_path / "out"))
    env = {"MNNPIPE_CACHE_URI": str(cache_dir)}
    key1 = json.loads(mnnpipe("-q", "run", "convert", "--spec", str(spec), env=env).stdout)["cache_key"]
    torch.manual_seed(2)
    torch.jit.trace(digits_cnn(width=0.5).eval(), torch.rand(1, 1, 8, 8)).save(str(model))
    rerun = json.loads(mnnpipe("-q", "run", "convert", "--spec", str(spec), env=env).stdout)
    assert rerun["cached"] is False and rerun["cache_key"] != key1


def test_manifest_records_lineage(model_file, tmp_path, cache_dir):
    spec = write_spec(tmp_path / "c.yaml", str(model_file), str(tmp_path / "out"))
    assert mnnpipe("-q", "run", "convert", "--spec", str(spec), env={"MNNPIPE_CACHE_URI": str(cache_dir)}).returncode == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["step"] == "convert"
    assert manifest["spec"]["model"]["uri"] == str(model_file)
    assert manifest["inputs"] == {str(model_file): sha256_file(model_file)}
    assert {"mnnpipe", "torch", "MNN", "onnx"} <= set(manifest["versions"])
    assert manifest["started_at"] <= manifest["finished_at"]
    assert set(manifest["artifacts"]) == {"model.mnn", "model.onnx"}
    assert manifest["metrics"] == manifest["result"]["metrics"]


def test_wrong_field_exits_2_naming_it(model_file, tmp_path):
    spec = write_spec(tmp_path / "c.yaml", str(model_file), str(tmp_path / "out"))
    proc = mnnpipe("run", "convert", "--spec", str(spec), "--set", "tolerance.min_cosine=2")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: tolerance.min_cosine: Input should be less than or equal to 1"]
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_json_logs_are_json_lines(model_file, tmp_path, cache_dir):
    spec = write_spec(tmp_path / "c.yaml", str(model_file), str(tmp_path / "out"))
    proc = mnnpipe("--log-format", "json", "run", "convert", "--spec", str(spec), env={"MNNPIPE_CACHE_URI": str(cache_dir)})
    assert proc.returncode == 0
    records = [json.loads(line) for line in proc.stderr.splitlines() if line.strip()]
    assert any(r["msg"].startswith("running convert") and r["level"] == "info" for r in records)


@pytest.mark.parametrize("step", STEP_NAMES)
def test_schema_prints_every_documented_field(step):
    proc = mnnpipe("schema", step)
    schema = json.loads(proc.stdout)
    assert schema["properties"]["kind"]["const"] == step
    undocumented = [name for name, prop in schema["properties"].items() if not prop.get("description")]
    assert undocumented == []


def test_s3_in_s3_out_round_trip(model_file, s3_server, s3_bucket, tmp_path, cache_dir):
    store = store_for(f"s3://{s3_bucket}/x")
    store.put(model_file, f"s3://{s3_bucket}/registry/digits/1/model.pt")
    spec = write_spec(tmp_path / "c.yaml", f"s3://{s3_bucket}/registry/digits/1/model.pt", f"s3://{s3_bucket}/artifacts/convert")
    env = {"MNNPIPE_S3_ENDPOINT_URL": s3_server.endpoint, "MNNPIPE_CACHE_URI": str(cache_dir)}
    proc = mnnpipe("-q", "run", "convert", "--spec", str(spec), env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    art = result["artifacts"]["model.mnn"]
    assert art["uri"] == f"s3://{s3_bucket}/artifacts/convert/model.mnn"
    body = s3_server.client().get_object(Bucket=s3_bucket, Key="artifacts/convert/model.mnn")["Body"].read()
    import hashlib

    assert hashlib.sha256(body).hexdigest() == art["sha256"]
    manifest = json.loads(store.read_bytes(f"s3://{s3_bucket}/artifacts/convert/manifest.json"))
    assert manifest["inputs"][f"s3://{s3_bucket}/registry/digits/1/model.pt"] == sha256_file(model_file)
