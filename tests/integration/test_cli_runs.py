"""The container entrypoint end to end: `mnnpipe run` as a process, its exit codes, the result
JSON, the manifest's lineage and the content-addressed cache, on local folders and on S3.

The runner, the cache and the lineage are the subject here, not a step's own work: these tests run
the fake `echo` step (tests/support/echo_step.py, milliseconds; fixture `echo_step`), found by the
`mnnpipe` process through MNNPIPE_STEP_MODULES. Each bundled step's own runs are tested in its file."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mnnpipe import catalog

STEP_NAMES = catalog.names()
from mnnpipe.store import sha256_file, store_for

pytestmark = pytest.mark.integration
MNNPIPE = [sys.executable, "-m", "mnnpipe.cli"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A model file; the echo step copies its bytes, and convert's spec errors come before reading it."""
    path = tmp_path_factory.mktemp("m") / "model.pt"
    path.write_bytes(b"model bytes " * 64)
    return path


def mnnpipe(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*MNNPIPE, *args], capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def write_spec(path: Path, model_uri: str, output: str) -> Path:
    path.write_text(f"output: {output}\nmodel: {{uri: '{model_uri}'}}\nrepeat: 2\n")
    return path


def write_convert_spec(path: Path, model_uri: str, output: str) -> Path:
    path.write_text(f"output: {output}\nmodel: {{uri: '{model_uri}'}}\ninputs: [{{name: input, shape: [1, 1, 8, 8]}}]\n")
    return path


@pytest.fixture
def logging_kept():
    """`main()` in-process configures the mnnpipe logger for a CLI run; put it back afterwards."""
    logger = logging.getLogger("mnnpipe")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


def test_second_identical_run_is_served_from_cache(echo_step, model_file, tmp_path, cache_dir):
    spec = write_spec(tmp_path / "echo.yaml", str(model_file), str(tmp_path / "out"))
    env = {"MNNPIPE_CACHE_URI": str(cache_dir)}
    first = mnnpipe("-q", "run", "echo", "--spec", str(spec), "--result", str(tmp_path / "r1.json"), env=env)
    assert first.returncode == 0, first.stderr
    r1 = json.loads(first.stdout)  # stdout is exactly the result JSON
    assert r1 == json.loads((tmp_path / "r1.json").read_text())
    assert r1["cached"] is False
    mnn = r1["artifacts"]["echo.mnn"]
    assert mnn["sha256"] == sha256_file(tmp_path / "out" / "echo.mnn") and mnn["size"] > 0

    second = mnnpipe("-q", "run", "echo", "--spec", str(spec), env=env)
    assert second.returncode == 0, second.stderr
    r2 = json.loads(second.stdout)
    assert r2["cached"] is True and r2["cache_key"] == r1["cache_key"]
    assert r2["artifacts"]["echo.mnn"]["sha256"] == mnn["sha256"]

    # Same work, another output prefix: served from the cache, copied and verified there.
    third = mnnpipe("-q", "run", "echo", "--spec", str(spec), "--set", f"output={tmp_path / 'elsewhere'}", env=env)
    r3 = json.loads(third.stdout)
    assert r3["cached"] is True
    assert sha256_file(tmp_path / "elsewhere" / "echo.mnn") == mnn["sha256"]
    assert json.loads((tmp_path / "elsewhere" / "manifest.json").read_text())["cached_from"] == str(tmp_path / "out")

    forced = mnnpipe("-q", "run", "echo", "--spec", str(spec), "--no-cache", env=env)
    assert json.loads(forced.stdout)["cached"] is False


def test_changed_input_bytes_miss_the_cache(echo_step, model_file, tmp_path, cache_dir):
    model = tmp_path / "model.pt"
    model.write_bytes(model_file.read_bytes())
    spec = write_spec(tmp_path / "c.yaml", str(model), str(tmp_path / "out"))
    env = {"MNNPIPE_CACHE_URI": str(cache_dir)}
    key1 = json.loads(mnnpipe("-q", "run", "echo", "--spec", str(spec), env=env).stdout)["cache_key"]
    model.write_bytes(b"other model bytes " * 64)
    rerun = json.loads(mnnpipe("-q", "run", "echo", "--spec", str(spec), env=env).stdout)
    assert rerun["cached"] is False and rerun["cache_key"] != key1


def test_manifest_records_lineage(echo_step, model_file, tmp_path, cache_dir):
    spec = write_spec(tmp_path / "c.yaml", str(model_file), str(tmp_path / "out"))
    assert mnnpipe("-q", "run", "echo", "--spec", str(spec), env={"MNNPIPE_CACHE_URI": str(cache_dir)}).returncode == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["step"] == "echo"
    assert manifest["spec"]["model"]["uri"] == str(model_file)
    assert manifest["inputs"] == {str(model_file): sha256_file(model_file)}
    assert {"mnnpipe", "torch", "MNN", "onnx"} <= set(manifest["versions"])
    assert manifest["started_at"] <= manifest["finished_at"]
    assert set(manifest["artifacts"]) == {"echo.mnn"}
    assert manifest["metrics"] == manifest["result"]["metrics"]


def test_wrong_field_exits_2_naming_it(model_file, tmp_path):
    spec = write_convert_spec(tmp_path / "c.yaml", str(model_file), str(tmp_path / "out"))
    proc = mnnpipe("run", "convert", "--spec", str(spec), "--set", "tolerance.min_cosine=2")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: tolerance.min_cosine: Input should be less than or equal to 1"]
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize(
    "fail, code, message",
    [
        ("spec", 2, "error: echo: failing as asked (fail: spec)"),
        ("input", 2, "error: echo: failing as asked (fail: input)"),
        ("step", 1, "error: echo: failing as asked (fail: step)"),
        ("tool", 1, "error: echo: failing as asked (fail: tool)"),
        ("store", 3, "error: echo: failing as asked (fail: store)"),
        ("internal", 1, "error: internal failure (RuntimeError: echo: failing as asked (fail: internal)); rerun with --debug for a traceback"),
    ],
    ids=["spec", "input", "step", "tool", "store", "internal"],
)
def test_a_failing_step_exits_with_its_errors_code_in_one_line_and_publishes_nothing(
    fail, code, message, echo_step, model_file, tmp_path, cache_dir, capsys, logging_kept
):
    from mnnpipe.cli import main

    spec = write_spec(tmp_path / "c.yaml", str(model_file), str(tmp_path / "out"))

    exit_code = main(["-q", "run", "echo", "--spec", str(spec), "--set", f"fail={fail}"])

    captured = capsys.readouterr()
    assert exit_code == code
    assert captured.err.strip().splitlines() == [message] and captured.out == ""
    assert not (tmp_path / "out").exists() or sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # the step wrote files: none published
    assert not cache_dir.exists() or list(cache_dir.iterdir()) == []  # and nothing for the cache to serve


def test_json_logs_are_json_lines(echo_step, model_file, tmp_path, cache_dir):
    spec = write_spec(tmp_path / "c.yaml", str(model_file), str(tmp_path / "out"))
    proc = mnnpipe("--log-format", "json", "run", "echo", "--spec", str(spec), env={"MNNPIPE_CACHE_URI": str(cache_dir)})
    assert proc.returncode == 0
    records = [json.loads(line) for line in proc.stderr.splitlines() if line.strip()]
    assert any(r["msg"].startswith("running echo") and r["level"] == "info" for r in records)


@pytest.mark.parametrize("step", STEP_NAMES)
def test_schema_prints_every_documented_field(step):
    proc = mnnpipe("schema", step)
    schema = json.loads(proc.stdout)
    assert schema["properties"]["kind"]["const"] == step
    undocumented = [name for name, prop in schema["properties"].items() if not prop.get("description")]
    assert undocumented == []


def test_s3_in_s3_out_round_trip(echo_step, model_file, s3_server, s3_bucket, tmp_path, cache_dir):
    store = store_for(f"s3://{s3_bucket}/x")
    store.put(model_file, f"s3://{s3_bucket}/registry/digits/1/model.pt")
    spec = write_spec(tmp_path / "c.yaml", f"s3://{s3_bucket}/registry/digits/1/model.pt", f"s3://{s3_bucket}/artifacts/echo")
    env = {"MNNPIPE_S3_ENDPOINT_URL": s3_server.endpoint, "MNNPIPE_CACHE_URI": str(cache_dir)}
    proc = mnnpipe("-q", "run", "echo", "--spec", str(spec), env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    art = result["artifacts"]["echo.mnn"]
    assert art["uri"] == f"s3://{s3_bucket}/artifacts/echo/echo.mnn"
    body = s3_server.client().get_object(Bucket=s3_bucket, Key="artifacts/echo/echo.mnn")["Body"].read()
    import hashlib

    assert hashlib.sha256(body).hexdigest() == art["sha256"]
    manifest = json.loads(store.read_bytes(f"s3://{s3_bucket}/artifacts/echo/manifest.json"))
    assert manifest["inputs"][f"s3://{s3_bucket}/registry/digits/1/model.pt"] == sha256_file(model_file)
