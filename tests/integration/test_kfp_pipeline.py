"""The compress pipeline end to end with kfp.local (lightweight components, the same launcher as
the container components) against the moto S3 server: train a tiny teacher, compress, release."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

DIGITS = {"format": "sklearn-digits", "preprocess": {"channels": "GRAY"}}


def recipe_for_digits() -> dict:
    """A recipe using every pipeline step, sized to run in about a minute."""
    recipe: dict = {
        "model": {"format": "state-dict", "factory": "mnnpipe.models:digits_cnn"},
        "distill": {
            "student": {"architecture": "digits_cnn", "width": 0.5},
            "dataset": {**DIGITS, "split": "all"},
            "training": {"epochs": 2, "batch_size": 64},
        },
        "prune": {  # distill hands over TorchScript: name the class Torch-Pruning rewrites
            "model": {"factory": "mnnpipe.models:digits_cnn", "factory_kwargs": {"width": 0.5}},
            "input": {"name": "input", "shape": [1, 1, 8, 8]},
            "target": {"ratio": 0.25},
            "finetune": {"dataset": {**DIGITS, "split": "train", "limit": 256}, "epochs": 1},
        },
        "convert": {"inputs": [{"name": "input", "shape": [1, 1, 8, 8]}], "num_samples": 4},
        "quantize": {
            "input": {"name": "input", "shape": [1, 1, 8, 8]},
            "calibration": {**DIGITS, "split": "train", "limit": 64},
            "evaluation": {**DIGITS, "split": "test", "limit": 200},
            "calibration_samples": 64,
            "max_accuracy_drop": 5.0,
        },
        # The benchmark measures the candidate (the last model made) as label "candidate"; the
        # gate compares its top-1 with the fp32 accuracy quantize measured.
        "benchmark": {"dataset": {**DIGITS, "split": "test", "limit": 100}, "warmup": 1, "iterations": 3},
        "gate": {"metric": "candidate/top1", "reference_metric": "fp32_accuracy", "max_drop": 5.0, "min_value": 0.5},
    }
    return recipe


@pytest.fixture
def teacher_uri(s3_bucket, s3_server, tmp_path):
    """A digits_cnn trained for 2 epochs, uploaded as a state-dict to the S3 model registry."""
    import torch

    from mnnpipe.data import load_dataset
    from mnnpipe.models import digits_cnn
    from mnnpipe.specs import DatasetRef
    from mnnpipe.train import FitConfig, fit, seed_everything

    seed_everything(0)
    train = load_dataset(DatasetRef.model_validate({**DIGITS, "split": "train"}), None)
    model = digits_cnn()
    fit(model, train, FitConfig(epochs=2, batch_size=64, lr=3e-3))
    path = tmp_path / "model.pth"
    torch.save(model.state_dict(), path)
    s3_server.client().upload_file(str(path), s3_bucket, "models/digits/1/model.pth")
    return f"s3://{s3_bucket}/models/digits/1/model.pth"


def test_compress_pipeline_runs_end_to_end_and_releases(teacher_uri, s3_bucket, s3_server, cache_dir, tmp_path, monkeypatch):
    # Arrange: kfp.local runs components as subprocesses of this interpreter's environment,
    # which inherit MNNPIPE_S3_ENDPOINT_URL (the moto server) and the private cache index.
    from kfp import local

    from mnnpipe.kfp.pipeline import build_pipeline
    from mnnpipe.recipe import parse_recipe, recipe_digest

    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.chdir(tmp_path)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp-root"))
    recipe = recipe_for_digits()
    digest = recipe_digest(parse_recipe(recipe))
    pipeline = build_pipeline(recipe, form="lightweight")

    # Act
    pipeline(
        model_uri=teacher_uri,
        model_name="digits",
        model_version="1",
        store_prefix=f"s3://{s3_bucket}/runs",
        release_root=f"s3://{s3_bucket}/released",
    )

    # Assert: the release holds an int8/fp32 .mnn whose bytes match its manifest, written last.
    s3 = s3_server.client()
    release = f"released/digits/1/{digest}"
    manifest = json.loads(s3.get_object(Bucket=s3_bucket, Key=f"{release}/manifest.json")["Body"].read())
    assert manifest["step"] == "gate"
    assert manifest["spec"]["recipe_digest"] == digest
    model_art = manifest["artifacts"]["model.mnn"]
    body = s3.get_object(Bucket=s3_bucket, Key=f"{release}/model.mnn")["Body"].read()
    assert len(body) == model_art["size"] > 0
    assert manifest["result"]["value"] >= 0.5
    # Every step published its own manifest under the run prefix in the step store.
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix=f"runs/digits/1/{digest}/")["Contents"]}
    for step in [s for s in ("distill", "prune", "convert", "quantize", "benchmark") if s in recipe]:
        assert f"runs/digits/1/{digest}/{step}/manifest.json" in keys


# --------------------------------------------------------------------------- fake KFP API server


class FakeKfpApi:
    """A minimal KFP v2beta1 REST API on 127.0.0.1 that records every request kfp.Client makes."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[tuple[str, str, dict]] = []
        self.experiments: list[dict] = []
        self.run_states: dict[str, str] = {}  # run_id -> state GET /runs/<id> reports
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _reply(self, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                api.requests.append(("GET", self.path, {}))
                if "/healthz" in self.path:
                    self._reply({"multi_user": False})
                elif "/experiments" in self.path:
                    self._reply({"experiments": api.experiments, "total_size": len(api.experiments)} if api.experiments else {})
                elif "/runs/" in self.path:
                    run_id = self.path.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
                    self._reply({"run_id": run_id, "state": api.run_states.get(run_id, "SUCCEEDED")})
                else:
                    self._reply({})

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                api.requests.append(("POST", self.path, body))
                if self.path.endswith("/experiments"):
                    exp = {"experiment_id": f"exp-{len(api.experiments) + 1}", "display_name": body.get("display_name")}
                    api.experiments.append(exp)
                    self._reply(exp)
                elif self.path.endswith("/recurringruns"):
                    self._reply({**body, "recurring_run_id": "rr-1"})
                elif self.path.endswith("/runs"):
                    self._reply({**body, "run_id": f"run-{len(api.posts('/runs'))}"})
                else:
                    self._reply({})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def posts(self, suffix: str) -> list[dict]:
        return [body for method, path, body in self.requests if method == "POST" and path.endswith(suffix)]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def kfp_api():
    api = FakeKfpApi()
    yield api
    api.stop()


@pytest.fixture
def kfp_client(kfp_api):
    import kfp

    return kfp.Client(host=kfp_api.host)


def test_nightly_creates_recurring_run_with_cron_pipeline_and_params(kfp_api, kfp_client):
    # Arrange
    from mnnpipe.kfp.schedule import create_nightly_run

    params = {"model_uri": "s3://models/digits/1/model.pth", "model_name": "digits", "model_version": "1"}

    # Act
    create_nightly_run(kfp_client, recipe_for_digits(), params=params, cron_expression="0 30 1 * * *")

    # Assert
    (body,) = kfp_api.posts("/recurringruns")
    assert body["trigger"]["cron_schedule"]["cron"] == "0 30 1 * * *"
    assert body["no_catchup"] is True
    assert int(body["max_concurrency"]) == 1
    assert body["runtime_config"]["parameters"] == params
    spec = body["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "mnnpipe-compress"
    assert "comp-mnnpipe-gate" in spec["components"]


def test_nightly_rejects_a_five_field_cron_before_calling_the_api(kfp_api, kfp_client):
    from mnnpipe.errors import SpecError
    from mnnpipe.kfp.schedule import create_nightly_run

    with pytest.raises(SpecError, match="6 fields"):
        create_nightly_run(kfp_client, recipe_for_digits(), params={}, cron_expression="0 2 * * *")
    assert kfp_api.posts("/recurringruns") == []


def test_recompress_starts_runs_only_for_versions_without_a_release(kfp_api, kfp_client, s3_bucket, s3_server):
    # Arrange: three versions in the registry; version 2 already released with this recipe,
    # version 3 released with a different recipe (other digest) only.
    from mnnpipe.recipe import parse_recipe, recipe_digest
    from mnnpipe.kfp.schedule import recompress

    s3 = s3_server.client()
    for version in ("1", "2", "3"):
        s3.put_object(Bucket=s3_bucket, Key=f"models/digits/{version}/model.pth", Body=b"weights")
    s3.put_object(Bucket=s3_bucket, Key="models/digits/3/notes.txt", Body=b"not a model")
    recipe = recipe_for_digits()
    digest = recipe_digest(parse_recipe(recipe))
    s3.put_object(Bucket=s3_bucket, Key=f"released/digits/2/{digest}/manifest.json", Body=b"{}")
    s3.put_object(Bucket=s3_bucket, Key="released/digits/3/0123456789abcdef/manifest.json", Body=b"{}")
    kwargs = dict(release_root=f"s3://{s3_bucket}/released", store_prefix=f"s3://{s3_bucket}/runs")

    # Act
    started = recompress(kfp_client, f"s3://{s3_bucket}/models/digits", recipe, **kwargs)
    s3.put_object(Bucket=s3_bucket, Key=f"released/digits/1/{digest}/manifest.json", Body=b"{}")
    s3.put_object(Bucket=s3_bucket, Key=f"released/digits/3/{digest}/manifest.json", Body=b"{}")
    again = recompress(kfp_client, f"s3://{s3_bucket}/models/digits", recipe, **kwargs)

    # Assert
    assert [v.version for v in started] == ["1", "3"]
    assert again == []
    runs = kfp_api.posts("/runs")
    assert len(runs) == 2
    params = [r["runtime_config"]["parameters"] for r in runs]
    assert [p["model_uri"] for p in params] == [f"s3://{s3_bucket}/models/digits/1/model.pth", f"s3://{s3_bucket}/models/digits/3/model.pth"]
    assert all(p["model_name"] == "digits" and p["release_root"] == f"s3://{s3_bucket}/released" for p in params)


def test_recompress_with_an_invalid_recipe_starts_nothing(kfp_api, kfp_client, s3_bucket, s3_server):
    from mnnpipe.errors import SpecError
    from mnnpipe.kfp.schedule import recompress

    s3_server.client().put_object(Bucket=s3_bucket, Key="models/digits/1/model.pth", Body=b"weights")
    recipe = recipe_for_digits()
    recipe["convert"]["num_samples"] = 0

    with pytest.raises(SpecError, match=r"recipe\.convert\.num_samples"):
        recompress(kfp_client, f"s3://{s3_bucket}/models/digits", recipe, release_root=f"s3://{s3_bucket}/released")
    assert kfp_api.posts("/runs") == []


# --------------------------------------------------------------------------- one image setting

PINNED = "registry.example.com/team/mnnpipe-step:0.1.0@sha256:" + "ab" * 32


def _images(pipeline_spec: dict) -> set[str]:
    executors = pipeline_spec["deploymentSpec"]["executors"].values()
    return {e["container"]["image"] for e in executors}


def test_mnnpipe_image_reaches_every_component_pipeline_schedule_and_pod(kfp_api, kfp_client, s3_bucket, s3_server, monkeypatch, tmp_path):
    import importlib.util

    import yaml

    from mnnpipe.kfp.components import make_component
    from mnnpipe.kfp.pipeline import build_pipeline, compile_pipeline
    from mnnpipe.kfp.schedule import create_nightly_run, recompress

    monkeypatch.setenv("MNNPIPE_IMAGE", PINNED)
    s3_server.client().put_object(Bucket=s3_bucket, Key="models/digits/1/model.pth", Body=b"weights")
    loaded = importlib.util.spec_from_file_location("compress_pipeline_file", Path(__file__).resolve().parents[2] / "pipelines" / "compress.py")
    pipeline_file = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(pipeline_file)

    create_nightly_run(kfp_client, recipe_for_digits(), params={"model_uri": "s3://models/digits/1/model.pth"})
    recompress(kfp_client, f"s3://{s3_bucket}/models/digits", recipe_for_digits(), release_root=f"s3://{s3_bucket}/released", store_prefix=f"s3://{s3_bucket}/runs")
    compile_pipeline(build_pipeline(recipe_for_digits()), str(tmp_path / "built.yaml"))
    compile_pipeline(pipeline_file.compress_pipeline(), str(tmp_path / "file.yaml"))
    component = make_component("convert")

    (nightly,) = kfp_api.posts("/recurringruns")
    (run,) = kfp_api.posts("/runs")
    assert _images(nightly["pipeline_spec"]) == {PINNED}
    assert _images(run["pipeline_spec"]) == {PINNED}
    for compiled in ("built.yaml", "file.yaml"):
        doc = yaml.safe_load((tmp_path / compiled).read_text())
        assert _images(doc) == {PINNED}
        assert f"Step image: {PINNED}. A release pins it by tag and digest" in doc["pipelineInfo"]["description"]
    assert component.component_spec.implementation.container.image == PINNED
    # an explicit argument wins over the environment
    assert make_component("convert", image="other/image:1").component_spec.implementation.container.image == "other/image:1"
    if importlib.util.find_spec("airflow.providers.cncf.kubernetes") is not None:
        from mnnpipe.airflow.operators import operator_class

        from mnnpipe.airflow.pod import pod_operator_class

        spec = {"model": {"uri": "s3://models/1/model.pt"}, "inputs": [{"shape": [1, 1, 8, 8]}], "output": "s3://out/c"}
        assert operator_class("convert")(task_id="c", spec=spec).image == PINNED
        assert pod_operator_class("convert")(task_id="c", spec=spec).image == PINNED  # the DAGs' pods


def test_recompress_skips_a_version_in_flight_and_backs_off_one_that_keeps_failing(kfp_api, kfp_client, s3_bucket, s3_server, caplog):
    import logging
    from datetime import datetime, timedelta, timezone

    from mnnpipe.recipe import parse_recipe, recipe_digest
    from mnnpipe.kfp.schedule import recompress

    s3 = s3_server.client()
    s3.put_object(Bucket=s3_bucket, Key="models/digits/1/model.pth", Body=b"weights")
    recipe = recipe_for_digits()
    digest = recipe_digest(parse_recipe(recipe))
    kwargs = dict(release_root=f"s3://{s3_bucket}/released", store_prefix=f"s3://{s3_bucket}/runs")
    t0 = datetime(2026, 11, 30, 2, 0, tzinfo=timezone.utc)

    def call(after: timedelta) -> list[str]:
        return [v.version for v in recompress(kfp_client, f"s3://{s3_bucket}/models/digits", recipe, now=t0 + after, **kwargs)]

    def record() -> dict:
        return json.loads(s3.get_object(Bucket=s3_bucket, Key=f"runs/digits/1/{digest}/recompress.json")["Body"].read())

    with caplog.at_level(logging.WARNING, logger="mnnpipe.kfp.schedule"):
        assert call(timedelta(0)) == ["1"]
        first = record()["run_id"]
        kfp_api.run_states[first] = "RUNNING"
        assert call(timedelta(hours=3)) == []  # still in flight: no duplicate run
        kfp_api.run_states[first] = "FAILED"
        assert call(timedelta(minutes=30)) == []  # failed: wait an hour before the second try
        assert call(timedelta(minutes=61)) == ["1"]
        kfp_api.run_states[record()["run_id"]] = "FAILED"
        assert call(timedelta(minutes=61 + 90)) == []  # the second failure doubles the wait

    assert len(kfp_api.posts("/runs")) == 2
    assert record()["attempts"] == 2
    reasons = [r.getMessage() for r in caplog.records]
    assert any(f"its run {first} is still RUNNING" in m for m in reasons)
    assert sum("released nothing; backing off until" in m for m in reasons) == 2


# --------------------------------------------------------------------------- a user's own pipeline


def tasks_inputs(pipeline_spec: dict, task: str) -> dict:
    return pipeline_spec["root"]["dag"]["tasks"][task]["inputs"]["parameters"]


def test_a_users_own_pipeline_uses_the_importable_components_on_a_cluster_and_locally(s3_bucket, s3_server, cache_dir, tmp_path, monkeypatch):
    """Own training component + mnnpipe components through `mnnpipe.kfp.components`: the same
    pipeline function compiles to container components for a cluster and runs on kfp.local."""
    import yaml
    from kfp import compiler, local
    from kfp.local.config import LocalExecutionConfig

    import importlib.util

    # The user's own module, as a user writes it (no `from __future__ import annotations`: kfp reads the types).
    loaded = importlib.util.spec_from_file_location("users_kfp_pipeline", Path(__file__).with_name("users_kfp_pipeline.py"))
    users = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(users)

    # on a cluster: container components in the step image, caching off, resources and retries set
    saved, LocalExecutionConfig.instance = LocalExecutionConfig.instance, None
    try:
        compiler.Compiler().compile(users.make_pipeline("http://minio.mnnpipe:9000"), str(tmp_path / "users.yaml"))
    finally:
        LocalExecutionConfig.instance = saved
    docs = list(yaml.safe_load_all((tmp_path / "users.yaml").read_text()))
    spec, platform = docs[0], docs[1]
    executors = spec["deploymentSpec"]["executors"]
    assert executors["exec-mnnpipe-convert"]["container"]["command"] == ["mnnpipe", "kfp-launch"]
    assert tasks_inputs(spec, "mnnpipe-convert")["num_samples"] == {"runtimeValue": {"constant": 4}}
    assert executors["exec-mnnpipe-convert"]["container"]["resources"]["cpuLimit"] == 2.0
    tasks = spec["root"]["dag"]["tasks"]
    for name in ("mnnpipe-convert", "mnnpipe-quantize"):
        assert tasks[name]["cachingOptions"] == {}  # off
        assert tasks[name]["retryPolicy"]["maxRetryCount"] == 2
    secrets = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-mnnpipe-convert"]["secretAsEnv"]
    assert secrets[0]["secretName"] == "mnnpipe-s3"
    assert executors["exec-mnnpipe-convert"]["container"]["env"] == [{"name": "MNNPIPE_S3_ENDPOINT_URL", "value": "http://minio.mnnpipe:9000"}]

    # locally: the same function, the lightweight twins, against the moto S3 server
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.chdir(tmp_path)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp-root"))

    users.make_pipeline()(registry=f"s3://{s3_bucket}/models/users", outputs=f"s3://{s3_bucket}/users")

    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket, Prefix="users/")["Contents"]}
    assert {"users/convert/manifest.json", "users/quantize/manifest.json", "users/benchmark/manifest.json"} <= keys
    measured = json.loads(s3_server.client().get_object(Bucket=s3_bucket, Key="users/benchmark/result.json")["Body"].read())
    assert {"fp32/top1", "int8/top1"} <= set(measured["metrics"])  # both wired models measured side by side
    manifest = json.loads(s3_server.client().get_object(Bucket=s3_bucket, Key="users/convert/manifest.json")["Body"].read())
    assert manifest["spec"]["num_samples"] == 4  # the typed parameter, not in the JSON spec
    quantized = json.loads(s3_server.client().get_object(Bucket=s3_bucket, Key="users/quantize/result.json")["Body"].read())
    assert quantized["size_bytes"] < quantized["fp32_size_bytes"]


# --------------------------------------------------------------------------- newest version at run time


def test_nightly_with_a_registry_resolves_the_newest_version_when_each_run_starts(kfp_api, kfp_client):
    from mnnpipe.kfp.schedule import create_nightly_run

    params = {"model_registry": "s3://models/digits", "store_prefix": "s3://mnnpipe/runs", "release_root": "s3://mnnpipe/released"}

    create_nightly_run(kfp_client, recipe_for_digits(), params=params)

    (body,) = kfp_api.posts("/recurringruns")
    assert body["runtime_config"]["parameters"] == params
    spec = body["pipeline_spec"]
    assert set(spec["root"]["inputDefinitions"]["parameters"]) >= {"model_registry"}
    assert "model_uri" not in spec["root"]["inputDefinitions"]["parameters"]  # nothing fixed at creation
    tasks = spec["root"]["dag"]["tasks"]
    assert spec["deploymentSpec"]["executors"]["exec-latest-version"]["container"]["args"][0] == "latest-version"
    first = tasks["mnnpipe-distill"]
    assert first["dependentTasks"] == ["latest-version"]
    # the steps' outputs and the release go under the resolved name and version
    gate_output = tasks["mnnpipe-gate"]["inputs"]["parameters"]["output_uri"]["runtimeValue"]["constant"]
    assert "latest-version-model_name" in gate_output and "latest-version-model_version" in gate_output


def test_the_resolver_writes_the_newest_version_for_kfp(tmp_path):
    from mnnpipe.errors import InputError
    from mnnpipe.kfp.launcher import run_executor_input

    for version in ("v2", "v10", "v9"):
        (tmp_path / "models" / version).mkdir(parents=True)
        (tmp_path / "models" / version / "model.pth").write_bytes(b"w")
    outputs = {name: {"outputFile": str(tmp_path / "out" / name)} for name in ("model_uri", "model_name", "model_version")}
    executor_input = {"inputs": {"parameterValues": {"model_registry": str(tmp_path / "models")}}, "outputs": {"parameters": outputs}}

    run_executor_input("latest-version", executor_input)

    assert (tmp_path / "out" / "model_version").read_text() == "v10"
    assert (tmp_path / "out" / "model_uri").read_text() == str(tmp_path / "models" / "v10" / "model.pth")
    assert (tmp_path / "out" / "model_name").read_text() == "models"
    empty = {**executor_input, "inputs": {"parameterValues": {"model_registry": str(tmp_path / "nothing")}}}
    with pytest.raises(InputError, match="model_registry: no model version under"):
        run_executor_input("latest-version", empty)


def test_the_resolvers_lightweight_twin_runs_on_kfp_local(tmp_path, monkeypatch):
    from kfp import local

    from mnnpipe.kfp.latest import make_latest_component

    for version in ("20261129T020000", "20261130T020000"):
        (tmp_path / "models" / version).mkdir(parents=True)
        (tmp_path / "models" / version / "model.pt").write_bytes(b"w")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp-root"))

    task = make_latest_component("lightweight", "localhost/mnnpipe-step:test")(model_registry=str(tmp_path / "models"))

    assert task.outputs["model_version"] == "20261130T020000"
    assert task.outputs["model_uri"] == str(tmp_path / "models" / "20261130T020000" / "model.pt")
