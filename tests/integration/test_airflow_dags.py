"""The bundled DAGs: they import cleanly, and each runs end to end with `dag.test()` (in-process
steps) against the moto S3 server, on a digits CNN trained for two epochs in a fixture.

Airflow gets a private AIRFLOW_HOME (SQLite, migrated once per module) before it is imported.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"
# Airflow reads these when first imported; tests/unit/test_airflow_operators.py sets the same ones.
os.environ.setdefault("MNNPIPE_TEST_AIRFLOW_HOME", tempfile.mkdtemp(prefix="mnnpipe-airflow-"))
os.environ["AIRFLOW_HOME"] = os.environ["MNNPIPE_TEST_AIRFLOW_HOME"]
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(DAGS)
os.environ["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] = "False"  # asset-scheduled DAGs queue only when unpaused

import pendulum  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("airflow.sdk", reason="needs the airflow extra")

pytestmark = pytest.mark.integration

DAG_IDS = {"mnn_nightly_compression", "mnn_recompress_on_new_model", "example_training_handoff", "mnn_recipe_search"}
STEPS = ("convert", "quantize", "benchmark")


@pytest.fixture(scope="module", autouse=True)
def in_process_steps():
    """The DAGs run steps in the worker here (there is no cluster); set before any DAG is parsed."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MNNPIPE_AIRFLOW_EXECUTION", "in_process")
    yield
    mp.undo()


@pytest.fixture(scope="module")
def airflow_db(in_process_steps):
    from airflow.utils import db

    db.resetdb()


@pytest.fixture(scope="module")
def dagbag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))  # examples are off: AIRFLOW__CORE__LOAD_EXAMPLES


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory) -> Path:
    """A digits CNN trained for 2 epochs, as TorchScript (the nightly DAG distils it to half width)."""
    from mnnpipe.data import load_dataset
    from mnnpipe.modelio import example_inputs, save_torchscript
    from mnnpipe.models import digits_cnn
    from mnnpipe.specs import DatasetRef
    from mnnpipe.train import FitConfig, fit, seed_everything

    seed_everything(0)
    train = load_dataset(DatasetRef(format="sklearn-digits", split="train", preprocess={"channels": "GRAY"}))
    model = digits_cnn(num_classes=10)
    fit(model, train, FitConfig(epochs=2, batch_size=64, lr=3e-3))
    return save_torchscript(model, example_inputs([(1, 1, 8, 8)]), tmp_path_factory.mktemp("model") / "model.pt")


def _publish_version(s3_server, bucket: str, version: str, model: Path) -> str:
    s3_server.client().upload_file(str(model), bucket, f"models/{version}/model.pt")
    return f"s3://{bucket}/models/{version}/model.pt"


def _return_values(dag_run) -> dict:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.scalars(XComModel.get_many(run_id=dag_run.run_id, dag_ids=dag_run.dag_id, key="return_value")).all()
        return {row.task_id: XComModel.deserialize_value(row) for row in rows}


def _exists(s3_server, bucket: str, key: str) -> bool:
    return s3_server.client().list_objects_v2(Bucket=bucket, Prefix=key).get("KeyCount", 0) > 0


# ------------------------------------------------------------------ parsing


def test_every_dag_imports_without_errors(dagbag) -> None:
    from mnnpipe.airflow.config import NEW_MODEL_ASSET

    assert dagbag.import_errors == {}
    assert DAG_IDS <= set(dagbag.dag_ids)
    nightly = dagbag.get_dag("mnn_nightly_compression")
    assert nightly.timetable.expression == "0 2 * * *"
    assert nightly.catchup is False and nightly.max_active_runs == 1
    recompress = dagbag.get_dag("mnn_recompress_on_new_model")
    assert recompress.timetable.asset_condition == NEW_MODEL_ASSET
    assert recompress.timetable.timetable.expression == "0 * * * *"  # and hourly, for uploads outside Airflow
    assert recompress.max_active_runs == 1
    handoff = dagbag.get_dag("example_training_handoff")
    assert NEW_MODEL_ASSET in handoff.get_task("announce_new_version").outlets
    for dag_id in DAG_IDS:  # every task retries a transient failure once and runs bounded
        for task in dagbag.get_dag(dag_id).tasks:
            assert task.retries == 1 and task.execution_timeout is not None, (dag_id, task.task_id)
    # the switch came from the environment, for every step operator
    assert {t.execution for t in nightly.tasks if hasattr(t, "execution")} == {"in_process"}


# ------------------------------------------------------------------ rendered from the recipe


def _parse_dag(name: str):
    """A fresh parse of dags/<name>.py (module globals included): what the DAG processor gets
    from the recipe as it is now."""
    import runpy

    return runpy.run_path(str(DAGS / f"{name}.py"), run_name=f"parsed_{name}")


def _pull(task_id: str, what: str) -> str:
    return "{{ ti.xcom_pull(task_ids='%s', map_indexes=ti.map_index)%s }}" % (task_id, what)


def assert_rendered_from(parsed: dict, recipe: dict, *, group: str, templates: dict[str, str], output: str, source_uri: str) -> None:
    """The DAG's step tasks are the recipe's plan, in its order, with its specs: each spec is the
    planned spec with every wire pulling the right model (the source, or the hand-off of the step
    the plan names), `templates` written over it, and `{output}/{step}` as output; the release
    task judges the plan's candidate with the plan's release spec and digest."""
    import copy

    from mnnpipe import catalog
    from mnnpipe.recipe import SOURCE, plan

    dag = parsed["dag"]
    recipe_plan = plan(recipe)
    prefix = f"{group}." if group else ""
    step_tasks = [t for t in dag.topological_sort() if hasattr(t, "spec") and t.step != "trend"]  # the trend follows the release
    assert [t.task_id for t in step_tasks] == [prefix + p.step for p in recipe_plan.steps]
    for task, planned in zip(step_tasks, recipe_plan.steps):
        spec = copy.deepcopy(task.spec)
        assert spec.pop("kind", planned.step) == planned.step  # the operator names its step
        assert spec.pop("output") == f"{output}/{planned.step}", task.task_id
        for wire in planned.wires:
            node = spec
            for part in wire.path:
                node = node[part]
            expected = source_uri if wire.source == SOURCE else _pull(prefix + wire.source, "['artifacts']['%s']['uri']" % catalog.get(wire.source).hands_on.artifact)
            assert node.pop("uri") == expected, (task.task_id, wire)
        for dotted, template in templates.items():
            step, *path = dotted.split(".")
            if step != planned.step:
                continue
            node = spec
            for part in path[:-1]:
                node = node[part]
            assert node[path[-1]] == template
            value = planned.spec
            for part in path:
                value = value[part]
            node[path[-1]] = value
        assert spec == planned.spec, task.task_id
    for upstream, downstream in zip(step_tasks, step_tasks[1:]):
        assert upstream.task_id in downstream.upstream_task_ids
    release = dag.get_task(prefix + "release")
    assert release.op_kwargs["planned"] == {
        "step": "gate", "spec": recipe_plan.release.spec, "candidate_from": recipe_plan.release.candidate_from,
        "metrics_from": recipe_plan.release.metrics_from, "reference_from": recipe_plan.release.reference_from,
    }  # fmt: skip
    assert release.op_kwargs["digest"] == recipe_plan.digest == parsed["PLAN"].digest
    judged = {recipe_plan.release.candidate_from, recipe_plan.release.metrics_from, recipe_plan.release.reference_from} - {None}
    assert {prefix + s for s in judged} <= release.upstream_task_ids


NIGHTLY_TEMPLATES = {"distill.training.epochs": "{{ params.distill_epochs }}", "prune.finetune.epochs": "{{ params.finetune_epochs }}"}


def test_the_nightly_dag_is_the_default_recipe_rendered(monkeypatch) -> None:
    """Every task of the nightly DAG comes from DEFAULT_RECIPE (its source read as TorchScript, as
    the registry holds it): change a section, and the DAG's spec changes with it."""
    from mnnpipe import default_recipe
    from mnnpipe.recipe import SOURCE_LABEL

    parsed = _parse_dag("mnn_nightly_compression")
    recipe = {**default_recipe.DEFAULT_RECIPE, "model": {"format": "torchscript"}}
    kwargs = dict(group="", templates=NIGHTLY_TEMPLATES, output=parsed["ARTIFACTS"], source_uri=_pull("latest_model", "['model_uri']"))
    assert_rendered_from(parsed, recipe, **kwargs)
    assert parsed["dag"].params["distill_epochs"] == 20 and parsed["dag"].params["finetune_epochs"] == 8  # the recipe's values
    assert parsed["dag"].get_task("distill").spec["teacher"]["format"] == "torchscript"

    # a changed recipe: other parameters, another budget, the benchmark beside the source only
    monkeypatch.setitem(default_recipe.DEFAULT_RECIPE, "distill", {**default_recipe.DEFAULT_RECIPE["distill"], "temperature": 2.5, "training": {"epochs": 3}})
    monkeypatch.setitem(default_recipe.DEFAULT_RECIPE, "quantize", {**default_recipe.DEFAULT_RECIPE["quantize"], "calibration_samples": 77})
    monkeypatch.setitem(default_recipe.DEFAULT_RECIPE, "compare", "source")
    benchmark = {k: v for k, v in default_recipe.DEFAULT_RECIPE["benchmark"].items() if k != "reference"}
    monkeypatch.setitem(default_recipe.DEFAULT_RECIPE, "benchmark", {**benchmark, "iterations": 7})
    monkeypatch.setitem(default_recipe.DEFAULT_RECIPE, "gate", {**default_recipe.DEFAULT_RECIPE["gate"], "max_drop": 2.5})
    changed = _parse_dag("mnn_nightly_compression")

    assert_rendered_from(changed, {**default_recipe.DEFAULT_RECIPE, "model": {"format": "torchscript"}}, **kwargs)
    dag = changed["dag"]
    assert dag.get_task("distill").spec["temperature"] == 2.5
    assert dag.params["distill_epochs"] == 3
    assert dag.get_task("quantize").spec["calibration_samples"] == 77
    assert dag.get_task("benchmark").spec["iterations"] == 7
    assert [m["label"] for m in dag.get_task("benchmark").spec["models"]] == [SOURCE_LABEL, "candidate"]
    assert dag.get_task("benchmark").spec["reference"] == SOURCE_LABEL  # the plan's default
    assert dag.get_task("release").op_kwargs["planned"]["spec"]["max_drop"] == 2.5
    assert dag.get_task("release").op_kwargs["digest"] != parsed["PLAN"].digest


def test_the_recompress_dag_is_the_compress_recipe_rendered(monkeypatch) -> None:
    """Each mapped `compress` instance is COMPRESS_RECIPE (DEFAULT_RECIPE's steps after training),
    wired inside the group; a step added to the recipe is a task in the group, in the plan's order."""
    from mnnpipe import default_recipe

    parsed = _parse_dag("mnn_recompress_on_new_model")
    kwargs = dict(group="compress", templates={}, output=f"{parsed['ARTIFACTS']}/{parsed['VERSION']}", source_uri=_pull("compress.version", "['model_uri']"))
    assert_rendered_from(parsed, {**default_recipe.COMPRESS_RECIPE, "model": {"format": "torchscript"}}, **kwargs)
    for step in ("convert", "quantize", "benchmark", "gate"):  # the default recipe's own sections
        assert default_recipe.COMPRESS_RECIPE[step] == default_recipe.DEFAULT_RECIPE[step]
    # the processed marker is this plan's release
    assert parsed["PLAN"].digest == parsed["dag"].get_task("compress.release").op_kwargs["digest"]

    # prune the model before converting it: a new task between the version and convert
    monkeypatch.setitem(default_recipe.COMPRESS_RECIPE, "prune", default_recipe.DEFAULT_RECIPE["prune"])
    monkeypatch.setitem(default_recipe.COMPRESS_RECIPE, "quantize", {**default_recipe.COMPRESS_RECIPE["quantize"], "calibration_samples": 50})
    changed = _parse_dag("mnn_recompress_on_new_model")

    assert_rendered_from(changed, {**default_recipe.COMPRESS_RECIPE, "model": {"format": "torchscript"}}, **kwargs)
    dag = changed["dag"]
    assert [t.task_id for t in dag.topological_sort()][2:6] == ["compress.prune", "compress.convert", "compress.quantize", "compress.benchmark"]
    assert dag.get_task("compress.convert").spec["model"]["uri"] == _pull("compress.prune", "['artifacts']['model.pt']['uri']")
    assert dag.get_task("compress.quantize").spec["calibration_samples"] == 50
    assert [m["label"] for m in dag.get_task("compress.benchmark").spec["models"]] == ["source", "prune", "convert", "candidate"]


def test_a_template_for_a_step_the_recipe_lacks_is_refused() -> None:
    from mnnpipe.airflow.pipelines import recipe_specs
    from mnnpipe.default_recipe import COMPRESS_RECIPE
    from mnnpipe.errors import SpecError
    from mnnpipe.recipe import plan

    with pytest.raises(SpecError, match="template 'distill.training.epochs'"):
        recipe_specs(plan(COMPRESS_RECIPE), model_uri="s3://b/m.pt", output="s3://b/out", templates={"distill.training.epochs": "{{ params.e }}"})
    specs = recipe_specs(plan(COMPRESS_RECIPE), model_uri="s3://b/m.pt", output="s3://b/out", templates={"quantize.calibration.limit": "{{ params.n }}"})
    assert specs["quantize"]["calibration"]["limit"] == "{{ params.n }}"
    assert specs["convert"]["model"] == {"format": "state-dict", "factory": "mnnpipe.models:digits_cnn", "uri": "s3://b/m.pt"}


# ------------------------------------------------------------------ end to end


def test_recompress_sweep_compresses_every_unprocessed_version(dagbag, s3_server, s3_bucket, cache_dir, digits_model, return_values_by_index) -> None:
    """A run without Asset events (hourly, or manual) sweeps the registry: every version not
    processed yet, one mapped `compress` instance each; a processed version is left alone."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from mnnpipe.airflow.config import RELEASED_ASSET
    from mnnpipe.registry import unprocessed_versions
    from mnnpipe.release import read_latest
    from mnnpipe import catalog

    DIGEST = dagbag.get_dag("mnn_recompress_on_new_model").get_task("compress.release").op_kwargs["digest"]

    _publish_version(s3_server, s3_bucket, "v1", digits_model)
    _publish_version(s3_server, s3_bucket, "v2", digits_model)
    _publish_version(s3_server, s3_bucket, "v3", digits_model)
    s3_server.client().put_object(Bucket=s3_bucket, Key=f"artifacts/released/models/v1/{DIGEST}/manifest.json", Body=b"{}")
    conf = {"model_registry": f"s3://{s3_bucket}/models", "artifact_prefix": f"s3://{s3_bucket}/artifacts"}

    run = dagbag.get_dag("mnn_recompress_on_new_model").test(run_conf=conf)

    assert run.state == "success"
    results = return_values_by_index(run)
    assert [v["version"] for v in results["versions_to_compress"][-1]] == ["v2", "v3"]
    for index, version in enumerate(["v2", "v3"]):
        assert results["compress.version"][index]["model_uri"] == f"s3://{s3_bucket}/models/{version}/model.pt"
        for step in STEPS:  # each instance publishes its own version's steps
            result = catalog.get(step).result.model_validate(results[f"compress.{step}"][index])
            assert result.output == f"s3://{s3_bucket}/artifacts/versions/{version}/{step}"
            assert _exists(s3_server, s3_bucket, f"artifacts/versions/{version}/{step}/manifest.json")
        quantized = catalog.get("quantize").result.model_validate(results["compress.quantize"][index])
        assert quantized.size_bytes < quantized.fp32_size_bytes
        assert quantized.model_dump()["artifacts"]["model.mnn"]["uri"].startswith(f"s3://{s3_bucket}/artifacts/versions/{version}/quantize/")
    assert not _exists(s3_server, s3_bucket, "artifacts/versions/v1/convert/")
    # each version passed the gate and was released; latest.json names the newest release
    for index, version in enumerate(["v2", "v3"]):
        released = results["compress.release"][index]
        assert released["released"] == f"s3://{s3_bucket}/artifacts/released/models/{version}/{DIGEST}"
        assert _exists(s3_server, s3_bucket, f"artifacts/released/models/{version}/{DIGEST}/manifest.json")
    latest = read_latest(f"s3://{s3_bucket}/artifacts/released", "models")
    assert latest["version"] == "v3"
    marker = f"s3://{s3_bucket}/artifacts/released/{{name}}/{{version}}/{DIGEST}/manifest.json"
    assert unprocessed_versions(conf["model_registry"], "model.pt", marker) == []
    with create_session() as session:  # one "compressed model released" event per version
        asset_id = session.scalar(select(AssetModel.id).where(AssetModel.name == RELEASED_ASSET.name))
        events = session.scalars(select(AssetEvent).where(AssetEvent.asset_id == asset_id, AssetEvent.source_run_id == run.run_id)).all()
    assert sorted(e.extra["version"] for e in events) == ["v2", "v3"]
    # one trend after the group, over every release of the model
    assert results["trend"][-1]["output"] == f"s3://{s3_bucket}/artifacts/released/models/trend"
    assert results["trend"][-1]["newest"] == "v3" and results["trend"][-1]["releases"] == 2


def test_nightly_compression_distils_prunes_and_compresses_the_latest_version(dagbag, s3_server, s3_bucket, cache_dir, digits_model) -> None:
    from airflow.models.variable import Variable

    from mnnpipe.airflow.config import path_segment
    from mnnpipe import catalog

    _publish_version(s3_server, s3_bucket, "20260101T000000", digits_model)
    latest = _publish_version(s3_server, s3_bucket, "20260102T000000", digits_model)
    # the artifact prefix comes from an Airflow Variable, the registry from a run param
    Variable.set("mnnpipe_artifact_prefix", f"s3://{s3_bucket}/from-variable")
    try:
        run = dagbag.get_dag("mnn_nightly_compression").test(
            logical_date=pendulum.datetime(2026, 3, 4, 2, tz="UTC"),
            run_conf={"model_registry": f"s3://{s3_bucket}/models", "distill_epochs": 1, "finetune_epochs": 1},
        )
    finally:
        Variable.delete("mnnpipe_artifact_prefix")

    assert run.state == "success"
    results = _return_values(run)
    assert results["latest_model"]["model_uri"] == latest
    distilled = catalog.get("distill").result.model_validate(results["distill"])
    assert distilled.epochs_run == 1
    assert distilled.student_params < distilled.teacher_params
    pruned = catalog.get("prune").result.model_validate(results["prune"])
    assert pruned.model_dump()["artifacts"]["model.pt"]["size"] < distilled.model_dump()["artifacts"]["model.pt"]["size"]
    run_segment = path_segment(run.run_id)  # each run its own prefix, whatever its logical date
    assert ":" not in run_segment and "+" not in run_segment and run_segment.startswith("manual__")
    for step in ("distill", "prune", *STEPS):
        assert results[step]["output"] == f"s3://{s3_bucket}/from-variable/nightly/{run_segment}/{step}"
        assert _exists(s3_server, s3_bucket, f"from-variable/nightly/{run_segment}/{step}/manifest.json")
    convert = catalog.get("convert").result.model_validate(results["convert"])
    assert convert.source_format == "torchscript"
    assert convert.artifacts["model.mnn"].uri.endswith(f"/nightly/{run_segment}/convert/model.mnn")
    benchmarked = catalog.get("benchmark").result.model_validate(results["benchmark"])
    assert [m.label for m in benchmarked.models] == ["source", "distill", "prune", "convert", "candidate"]  # compare: every-step
    digest = dagbag.get_dag("mnn_nightly_compression").get_task("release").op_kwargs["digest"]
    assert results["release"]["released"] == f"s3://{s3_bucket}/from-variable/released/models/20260102T000000/{digest}"
    assert _exists(s3_server, s3_bucket, f"from-variable/released/models/20260102T000000/{digest}/manifest.json")
    # then the trend of the model's releases
    assert results["trend"]["output"] == f"s3://{s3_bucket}/from-variable/released/models/trend"
    assert results["trend"]["newest"] == "20260102T000000"
    assert _exists(s3_server, s3_bucket, "from-variable/released/models/trend/trend.html")


def test_training_handoff_publishes_a_version_and_queues_recompression(dagbag, s3_server, s3_bucket, cache_dir) -> None:
    from airflow.models.asset import AssetDagRunQueue, AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from mnnpipe.airflow.config import NEW_MODEL_ASSET

    run = dagbag.get_dag("example_training_handoff").test(
        logical_date=pendulum.datetime(2026, 5, 6, 7, 8, 9, tz="UTC"),
        run_conf={"model_registry": f"s3://{s3_bucket}/models", "epochs": 1},
    )

    assert run.state == "success"
    assert _exists(s3_server, s3_bucket, "models/20260506T070809/model.pt")
    with create_session() as session:
        asset_id = session.scalar(select(AssetModel.id).where(AssetModel.name == NEW_MODEL_ASSET.name))
        event = session.scalars(select(AssetEvent).where(AssetEvent.source_run_id == run.run_id)).one()
        queued = session.scalars(select(AssetDagRunQueue.target_dag_id).where(AssetDagRunQueue.asset_id == asset_id)).all()
    assert event.asset_id == asset_id
    assert event.extra == {"version": "20260506T070809", "model_uri": f"s3://{s3_bucket}/models/20260506T070809/model.pt"}
    assert "mnn_recompress_on_new_model" in queued


def test_the_pod_command_runs_the_step_outside_airflow(s3_server, s3_bucket, cache_dir, digits_model, tmp_path) -> None:
    """What a pod would run, run here: the kubernetes mode's command is a working step invocation."""
    import json
    import subprocess

    pytest.importorskip("airflow.providers.cncf.kubernetes", reason="needs the k8s extra")
    from mnnpipe.airflow.operators import POD_RESULT_PATH, MnnConvertOperator
    from mnnpipe import catalog

    model_uri = _publish_version(s3_server, s3_bucket, "v5", digits_model)
    op = MnnConvertOperator(
        task_id="convert",
        execution="kubernetes",
        spec={"model": {"uri": model_uri}, "inputs": [{"shape": [1, 1, 8, 8]}], "output": f"s3://{s3_bucket}/pod/convert"},
    )
    argv = op.pod_command(op.validated_spec())
    result_file = tmp_path / "return.json"
    argv[argv.index(POD_RESULT_PATH)] = str(result_file)  # the xcom sidecar's folder exists only in a pod
    argv[0:1] = [sys.executable, "-m", "mnnpipe.cli"]  # the image's `mnnpipe`, from this environment

    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=os.environ.copy())

    assert done.returncode == 0, done.stderr[-2000:]
    result = catalog.get("convert").result.model_validate(json.loads(result_file.read_text()))
    assert result.output == f"s3://{s3_bucket}/pod/convert"
    assert _exists(s3_server, s3_bucket, "pod/convert/manifest.json")
