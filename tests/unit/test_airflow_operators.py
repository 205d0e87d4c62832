"""mnnpipe's Airflow operators, sensor and trigger without a scheduler or a database.

The KubernetesPodOperator mode is checked by rendering the pod offline and validating it with
kubernetes-validate; those tests skip when the `k8s` extra is not installed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Airflow reads its settings when first imported (AIRFLOW_HOME, the DAGs folder): set them before
# that, the same as tests/integration/test_airflow_dags.py does, whichever module pytest imports first.
os.environ.setdefault("MNNPIPE_TEST_AIRFLOW_HOME", tempfile.mkdtemp(prefix="mnnpipe-airflow-"))
os.environ["AIRFLOW_HOME"] = os.environ["MNNPIPE_TEST_AIRFLOW_HOME"]
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(Path(__file__).resolve().parents[2] / "dags")
os.environ["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] = "False"

import asyncio  # noqa: E402
import json  # noqa: E402
import threading  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("airflow.sdk", reason="needs the airflow extra")

from mnnpipe.airflow import operators  # noqa: E402
from mnnpipe.airflow.operators import MnnStepOperator, operator_class, spec_dict  # noqa: E402
from mnnpipe.registry import list_versions, next_version, version_key  # noqa: E402
from mnnpipe.container import step_command  # noqa: E402
from mnnpipe.errors import SpecError  # noqa: E402
from mnnpipe import catalog  # noqa: E402

CONVERT_SPEC = {
    "model": {"uri": "s3://models/digits/{{ ds_nodash }}/model.pt"},
    "inputs": [{"name": "input", "shape": [1, 1, 8, 8]}],
    "output": "s3://artifacts/digits/{{ ds }}/convert",
}


def needs_convert() -> None:
    if "convert" not in catalog.names():
        pytest.skip("the convert step is not in this installation yet")


# ------------------------------------------------------------------ provider and classes


def test_provider_is_registered_with_airflow() -> None:
    from airflow.providers_manager import ProvidersManager

    providers = ProvidersManager().providers

    assert "mnnpipe" in providers
    info = providers["mnnpipe"].data
    assert info["operators"][0]["python-modules"] == ["mnnpipe.airflow.operators"]
    assert info["sensors"][0]["python-modules"] == ["mnnpipe.airflow.sensors"]


def test_one_operator_class_per_step_named_after_it() -> None:
    for step in catalog.names():
        cls = getattr(operators, f"Mnn{step.capitalize()}Operator")

        assert issubclass(cls, MnnStepOperator)
        assert cls.step == step
        assert cls is operator_class(step)
        assert cls.__module__ == "mnnpipe.airflow.operators"  # importable by name: DAG serialization
        assert "spec" in cls.template_fields
        for field in catalog.get(step).spec.model_fields:  # docs generated from the Spec
            if field not in ("kind", "schema_version"):
                assert f"``{field}``" in cls.__doc__


def test_the_base_class_cannot_run_a_step() -> None:
    with pytest.raises(TypeError, match="base class"):
        MnnStepOperator(task_id="x", spec={}, execution="in_process")


# ------------------------------------------------------------------ validation at parse time


def test_templated_uris_pass_parse_time_validation_and_keep_their_templates() -> None:
    needs_convert()

    op = operator_class("convert")(task_id="convert", spec=CONVERT_SPEC, execution="in_process")

    assert op.spec["model"]["uri"] == "s3://models/digits/{{ ds_nodash }}/model.pt"
    assert op.spec["kind"] == "convert"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"opset": 3}, "spec.opset"),
        ({"bogus": 1}, "spec.bogus: unknown field"),
        ({"model": {"uri": "s3://models/{{ ds }}/model.zip"}}, "spec.model: format is 'auto'"),
        ({"output": "ftp://host/{{ ds }}"}, "spec.output: output has unsupported scheme"),
        ({"kind": "quantize"}, "kind: spec is for step 'quantize'"),
    ],
)
def test_invalid_specs_fail_when_the_dag_is_parsed(change: dict, message: str) -> None:
    needs_convert()

    with pytest.raises(SpecError, match=message.replace("(", r"\(")):
        operator_class("convert")(task_id="convert", spec={**CONVERT_SPEC, **change}, execution="in_process")


def test_a_value_that_is_wholly_a_template_is_checked_after_rendering() -> None:
    needs_convert()
    spec = {**CONVERT_SPEC, "model": {"uri": "{{ ti.xcom_pull(task_ids='train')['model_uri'] }}"}, "num_samples": "{{ params.n }}"}

    op = operator_class("convert")(task_id="convert", spec=spec, execution="in_process")
    op.render_template_fields({"ti": _FakeTI({"model_uri": "s3://models/v1/model.pt"}), "params": {"n": 4}, "ds": "2026-01-01", "ds_nodash": "20260101"})
    rendered = op.validated_spec()

    assert rendered.model.uri == "s3://models/v1/model.pt"
    assert rendered.model.format == "torchscript"
    assert rendered.num_samples == 4


def test_a_rendered_spec_is_validated_in_full() -> None:
    needs_convert()
    spec = {**CONVERT_SPEC, "num_samples": "{{ params.n }}"}
    op = operator_class("convert")(task_id="convert", spec=spec, execution="in_process")

    op.render_template_fields({"params": {"n": -1}, "ds": "2026-01-01", "ds_nodash": "20260101"})

    with pytest.raises(SpecError, match="num_samples"):
        op.validated_spec()


def test_a_spec_instance_of_another_step_is_refused() -> None:
    needs_convert()
    if "benchmark" not in catalog.names():
        pytest.skip("needs the benchmark step")
    other = catalog.get("benchmark").spec(
        models=[{"label": "m", "model": {"uri": "m.mnn"}}], inputs=[{"shape": [1, 4]}], output="out"
    )

    with pytest.raises(SpecError, match="expected a convert spec"):
        spec_dict("convert", other)


def test_execution_is_one_of_two_modes() -> None:
    needs_convert()

    with pytest.raises(SpecError, match="execution: expected one of in_process, kubernetes"):
        operator_class("convert")(task_id="c", spec=CONVERT_SPEC, execution="docker")


@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "DB_PASSWORD", "AWS_ACCESS_KEY_ID"])
def test_credentials_are_refused_as_plain_environment(name: str) -> None:
    needs_convert()

    with pytest.raises(SpecError, match=f"env_vars: '{name}' looks like a credential"):
        operator_class("convert")(task_id="c", spec=CONVERT_SPEC, execution="in_process", env_vars={name: "x"})


def test_container_resources_must_be_kubernetes_quantities() -> None:
    needs_convert()

    with pytest.raises(SpecError, match="container_resources.limits.memory: '4 GB'"):
        operator_class("convert")(
            task_id="c", spec=CONVERT_SPEC, execution="in_process", container_resources={"limits": {"memory": "4 GB"}}
        )


def test_a_missing_input_fails_the_task_without_retries(tmp_path: Path) -> None:
    needs_convert()
    from airflow.sdk.exceptions import AirflowFailException

    spec = {**CONVERT_SPEC, "model": {"uri": str(tmp_path / "absent" / "model.pt")}, "output": str(tmp_path / "out")}
    op = operator_class("convert")(task_id="convert", spec=spec, execution="in_process", retries=3)

    with pytest.raises(AirflowFailException, match=r"convert: .*absent/model.pt"):
        op.execute({})
    assert not (tmp_path / "out" / "manifest.json").exists()  # nothing published


class _FakeTI:
    """Stands in for a task instance in a template context: only xcom_pull is used."""

    def __init__(self, value: dict) -> None:
        self.value = value

    def xcom_pull(self, task_ids: str) -> dict:
        return self.value


# ------------------------------------------------------------------ kubernetes mode


@pytest.fixture
def offline_kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A kubeconfig naming a cluster that is never contacted: rendering a pod needs one."""
    path = tmp_path / "kubeconfig"
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: offline\n"
        "clusters: [{name: offline, cluster: {server: 'https://127.0.0.1:1'}}]\n"
        "contexts: [{name: offline, context: {cluster: offline, user: offline}}]\n"
        "users: [{name: offline, user: {token: not-a-secret}}]\n"
    )
    monkeypatch.setenv("KUBECONFIG", str(path))
    # kubernetes reads $KUBECONFIG once, at import; another test (kfp) may have imported it first.
    import kubernetes.config.kube_config as kube_config

    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    return path


def _rendered_pod(op: MnnStepOperator) -> dict:
    from kubernetes.client import ApiClient

    pod = op.build_pod_operator().build_pod_request_obj(context=None)
    return ApiClient().sanitize_for_serialization(pod)


def test_kubernetes_mode_renders_a_valid_pod_with_the_step_image_and_command(offline_kubeconfig: Path) -> None:
    needs_convert()
    pytest.importorskip("airflow.providers.cncf.kubernetes", reason="needs the k8s extra")
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="needs the k8s extra")
    spec = {**CONVERT_SPEC, "model": {"uri": "s3://models/digits/v7/model.pt"}, "output": "s3://artifacts/digits/v7/convert"}
    op = operator_class("convert")(
        task_id="convert",
        spec=spec,
        execution="kubernetes",
        image="registry.example.com/mnnpipe-step:0.1.0",
        namespace="ml",
        env_vars={"MNNPIPE_S3_ENDPOINT_URL": "http://minio.ml:9000"},
        secret_env_from=["mnnpipe-s3"],
        container_resources={"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "3Gi"}},
    )

    doc = _rendered_pod(op)
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)  # raises when invalid

    base = next(c for c in doc["spec"]["containers"] if c["name"] == "base")
    argv = base["command"] + base["args"]
    assert doc["metadata"]["namespace"] == "ml"
    assert base["image"] == "registry.example.com/mnnpipe-step:0.1.0"
    assert argv[:3] == ["mnnpipe", "run", "convert"]
    assert argv == step_command("convert", argv[4], result_path="/airflow/xcom/return.json")
    sent = catalog.get("convert").spec.model_validate_json(argv[4])
    assert sent.model.uri == "s3://models/digits/v7/model.pt"
    assert base["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "3Gi"}}
    assert base["env"] == [{"name": "MNNPIPE_S3_ENDPOINT_URL", "value": "http://minio.ml:9000"}]
    assert base["envFrom"] == [{"secretRef": {"name": "mnnpipe-s3"}}]
    # Pod Security "restricted", for every container, the pinned xcom sidecar included
    restricted = {
        "allowPrivilegeEscalation": False, "runAsNonRoot": True, "runAsUser": 10001,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert all(c["securityContext"] == restricted for c in doc["spec"]["containers"])
    assert doc["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert doc["spec"]["securityContext"]["runAsNonRoot"] is True
    # the result comes back through the xcom sidecar, whose image is pinned
    sidecar = next(c for c in doc["spec"]["containers"] if c["name"] == "airflow-xcom-sidecar")
    assert sidecar["image"] == "alpine:3.20.3"
    assert doc["spec"]["activeDeadlineSeconds"] == 600 + 600  # convert's timeout_s, plus the margin


def test_no_credential_of_the_worker_reaches_the_pod_spec(offline_kubeconfig: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    needs_convert()
    pytest.importorskip("airflow.providers.cncf.kubernetes", reason="needs the k8s extra")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWORKERKEY0000000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "worker-secret-value-must-not-leak")
    spec = {**CONVERT_SPEC, "model": {"uri": "s3://models/v1/model.pt"}, "output": "s3://artifacts/v1/convert"}
    op = operator_class("convert")(task_id="convert", spec=spec, execution="kubernetes", use_cache=False)

    text = json.dumps(_rendered_pod(op))

    assert "worker-secret-value-must-not-leak" not in text
    assert "AKIAWORKERKEY0000000" not in text
    assert '"--no-cache"' in text


def test_kubernetes_mode_without_the_provider_fails_at_parse_time(monkeypatch: pytest.MonkeyPatch) -> None:
    needs_convert()
    monkeypatch.setattr(operators, "kubernetes_provider_installed", lambda: False)

    with pytest.raises(SpecError, match=r"mnnpipe\[k8s\]"):
        operator_class("convert")(task_id="c", spec=CONVERT_SPEC, execution="kubernetes")


# ------------------------------------------------------------------ registry, sensor, trigger


def _publish(registry: Path, version: str, name: str = "model.pt") -> None:
    (registry / version).mkdir(parents=True, exist_ok=True)
    (registry / version / name).write_bytes(b"model " + version.encode())


def test_versions_sort_naturally() -> None:
    assert sorted(["v10", "v9", "v100"], key=version_key) == ["v9", "v10", "v100"]
    assert sorted(["20261128T0930", "20261127T2359"], key=version_key) == ["20261127T2359", "20261128T0930"]


def test_the_newest_unprocessed_version_is_next_and_older_ones_are_superseded(tmp_path: Path) -> None:
    registry, artifacts = tmp_path / "models", tmp_path / "artifacts"
    for v in ("v1", "v2", "v10"):
        _publish(registry, v)
    _publish(registry, "v11", name="notes.txt")  # not a model version
    marker = str(artifacts / "{version}" / "benchmark" / "manifest.json")

    assert [v.version for v in list_versions(str(registry), "model.pt")] == ["v1", "v2", "v10"]
    assert next_version(str(registry), "model.pt", marker).version == "v10"
    _publish(artifacts / "v10", "benchmark", name="manifest.json")
    assert next_version(str(registry), "model.pt", marker) is None  # v1, v2 are superseded by v10


def test_sensor_defers_to_the_trigger_when_nothing_is_new(tmp_path: Path) -> None:
    from airflow.sdk.exceptions import TaskDeferred

    from mnnpipe.airflow.sensors import MnnNewModelVersionSensor
    from mnnpipe.airflow.triggers import NewModelVersionTrigger

    sensor = MnnNewModelVersionSensor(
        task_id="wait", registry=str(tmp_path / "models"), processed_marker=str(tmp_path / "done" / "{version}"), poke_interval=7
    )

    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute({})

    trigger = deferred.value.trigger
    assert isinstance(trigger, NewModelVersionTrigger)
    path, kwargs = trigger.serialize()
    assert path == "mnnpipe.airflow.triggers.NewModelVersionTrigger"
    assert NewModelVersionTrigger(**kwargs).serialize() == (path, kwargs)
    assert kwargs["poke_interval"] == 7


def test_sensor_returns_the_version_without_deferring_when_it_is_there(tmp_path: Path) -> None:
    from mnnpipe.airflow.sensors import MnnNewModelVersionSensor

    _publish(tmp_path / "models", "v3")
    sensor = MnnNewModelVersionSensor(task_id="wait", registry=str(tmp_path / "models"), processed_marker=str(tmp_path / "{version}.done"))

    found = sensor.execute({})

    assert found == {"version": "v3", "model_uri": str(tmp_path / "models" / "v3" / "model.pt"), "name": "models"}


def test_sensor_needs_a_version_placeholder_in_its_marker() -> None:
    from mnnpipe.airflow.sensors import MnnNewModelVersionSensor

    with pytest.raises(SpecError, match=r"processed_marker must contain '\{version\}'"):
        MnnNewModelVersionSensor(task_id="wait", registry="s3://models/x", processed_marker="s3://artifacts/done")


def test_trigger_fires_once_a_version_is_published(tmp_path: Path) -> None:
    from mnnpipe.airflow.triggers import NewModelVersionTrigger

    registry = tmp_path / "models"
    trigger = NewModelVersionTrigger(
        registry=str(registry), model_filename="model.pt", processed_marker=str(tmp_path / "{version}.done"), poke_interval=0.05
    )
    later = threading.Timer(0.3, _publish, args=(registry, "v1"))

    async def first_event():
        return await asyncio.wait_for(trigger.run().__anext__(), timeout=20)

    later.start()
    event = asyncio.run(first_event())

    assert event.payload == {"status": "found", "version": "v1", "model_uri": str(registry / "v1" / "model.pt"), "name": registry.name}


def test_trigger_reports_an_unreadable_store_as_an_error_event(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mnnpipe import store
    from mnnpipe.airflow.triggers import NewModelVersionTrigger

    _publish(tmp_path / "models", "v2")
    monkeypatch.setenv("MNNPIPE_S3_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("MNNPIPE_S3_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("MNNPIPE_S3_CONNECT_TIMEOUT", "0.5")
    store._s3_store.cache_clear()
    trigger = NewModelVersionTrigger(
        registry=str(tmp_path / "models"),
        model_filename="model.pt",
        processed_marker="s3://unreachable-store/{version}/manifest.json",
        poke_interval=0.05,
    )

    try:
        event = asyncio.run(asyncio.wait_for(trigger.run().__anext__(), timeout=30))
    finally:
        store._s3_store.cache_clear()

    assert event.payload["status"] == "error"
    assert "unreachable-store/v2/manifest.json" in event.payload["message"]


# ------------------------------------------------------------------ the DAGs in kubernetes mode


class _Vars:
    """`var.value` in a template context: every Variable unset, so defaults apply."""

    def get(self, key: str, default: str | None = None) -> str | None:
        return default


class _TIByTask:
    map_index = 0  # the first instance of a mapped task group

    def __init__(self, values: dict[str, dict]) -> None:
        self.values = values

    def xcom_pull(self, task_ids: str, map_indexes: int = -1) -> dict:
        assert map_indexes == self.map_index  # pulls from its own instance of the group
        return self.values[task_ids]


def test_the_recompress_dag_runs_every_step_in_a_pod_by_default(offline_kubeconfig: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("airflow.providers.cncf.kubernetes", reason="needs the k8s extra")
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="needs the k8s extra")
    from airflow.dag_processing.dagbag import DagBag
    from kubernetes.client import ApiClient

    from mnnpipe.airflow.pod import MnnStepPodOperator

    monkeypatch.delenv("MNNPIPE_AIRFLOW_EXECUTION", raising=False)
    monkeypatch.setenv("MNNPIPE_K8S_NAMESPACE", "compression")
    monkeypatch.setenv("MNNPIPE_S3_ENDPOINT_URL", "http://127.0.0.1:9000")  # the scheduler's own: never the pod's
    monkeypatch.setenv("MNNPIPE_K8S_S3_ENDPOINT_URL", "http://minio.compression:9000")
    monkeypatch.setenv("MNNPIPE_K8S_S3_SECRET", "")  # IRSA: the service account carries the role
    monkeypatch.setenv("MNNPIPE_K8S_SERVICE_ACCOUNT", "mnnpipe-irsa")
    monkeypatch.setenv("MNNPIPE_K8S_IMAGE_PULL_POLICY", "Always")
    dag_file = Path(__file__).resolve().parents[2] / "dags" / "mnn_recompress_on_new_model.py"

    bag = DagBag(dag_folder=str(dag_file))
    dag = bag.dags["mnn_recompress_on_new_model"]  # get_dag would consult the (absent) database
    steps = [t for t in dag.tasks if isinstance(t, MnnStepPodOperator)]
    mnn = {"artifacts": {"model.mnn": {"uri": "s3://artifacts/v9/convert/model.mnn"}}}
    context = {
        "params": {"model_registry": "s3://models/digits", "artifact_prefix": "s3://artifacts/digits"},
        "var": {"value": _Vars()},
        "ti": _TIByTask({"compress.version": {"version": "v9", "model_uri": "s3://models/digits/v9/model.pt"}, "compress.convert": mnn, "compress.quantize": mnn}),
    }

    assert bag.import_errors == {}
    assert [t.task_id for t in steps] == ["compress.convert", "compress.quantize", "compress.benchmark", "trend"]
    assert steps[-1].deferrable is True  # the trend after the release runs in a pod too
    for op in steps[:-1]:
        op.render_template_fields(context)
        op.prepare()
        doc = ApiClient().sanitize_for_serialization(op.build_pod_request_obj(context=None))
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
        base = next(c for c in doc["spec"]["containers"] if c["name"] == "base")
        spec = catalog.get(op.step).spec.model_validate_json(base["args"][3])

        assert op.deferrable is True  # waits in the triggerer, not in a worker slot
        assert doc["metadata"]["namespace"] == "compression"
        assert doc["spec"]["serviceAccountName"] == "mnnpipe-irsa"
        assert base["imagePullPolicy"] == "Always"
        assert not base.get("envFrom")  # no Secret at all, not a secretRef with an empty name
        assert base["env"] == [{"name": "MNNPIPE_S3_ENDPOINT_URL", "value": "http://minio.compression:9000"}]
        assert doc["spec"]["activeDeadlineSeconds"] == int(spec.timeout_s) + 600
        assert spec.output == f"s3://artifacts/digits/versions/v9/{op.step}"


def test_run_ids_become_distinct_safe_path_segments() -> None:
    from mnnpipe.airflow.config import path_segment

    manual = path_segment("manual__2026-11-30T04:05:06.123456+00:00")
    scheduled = path_segment("scheduled__2026-11-30T02:00:00+00:00")

    assert manual == "manual__2026-11-30T04-05-06.123456-00-00"
    assert scheduled != manual and ":" not in scheduled and "+" not in scheduled
    assert path_segment("../..") == "run"  # never a path that climbs out of its prefix


def test_a_step_summary_is_one_line_of_its_headline_metrics() -> None:
    from mnnpipe.airflow.operators import summary_line
    from mnnpipe.specs import StepResult

    result = StepResult(
        kind="quantize",
        output="s3://out/quantize",
        metrics={"step_seconds": 1.25, "size_ratio": 0.33, "cosine": 0.99991, "accuracy": 0.981, "calibration_samples": 64.0},
    )

    line = summary_line("quantize", result)

    # size, fidelity, accuracy, time; counts that say nothing about the model are left out
    assert line == "quantize summary: size_ratio=0.33 cosine=0.99991 accuracy=0.981 step_seconds=1.25 -> s3://out/quantize"


def test_a_step_running_in_the_worker_is_never_silent_for_long() -> None:
    import time

    from mnnpipe.airflow.operators import heartbeat

    class Log:
        lines: list[str] = []

        def info(self, msg: str, *args) -> None:
            self.lines.append(msg % args)

    log = Log()
    with heartbeat(log, "quantize", every=0.05):
        time.sleep(0.3)
    count = len(log.lines)
    time.sleep(0.15)

    assert count >= 3 and all(line.startswith("quantize still running (") for line in log.lines)
    assert len(log.lines) == count  # stops with the step
