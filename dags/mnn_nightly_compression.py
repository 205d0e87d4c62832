"""Nightly: distil the newest model version into a smaller student, then convert, quantize to
full int8 and benchmark it.

Runs at 02:00 UTC, no catch-up, one run at a time. Takes the newest version under the model
registry (`{model_registry}/{version}/model.pt`, processed or not: nightly re-runs are cheap,
every step serves an identical earlier run from mnnpipe's content-addressed cache) and publishes
each step to `{artifact_prefix}/nightly/{ds}/{step}`.

Configuration (see mnnpipe.airflow.config): params / Variables / env `model_registry`,
`artifact_prefix`; params `distill_epochs`, `student_width`; env MNNPIPE_AIRFLOW_EXECUTION
(kubernetes | in_process).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Param, get_current_context, task

from mnnpipe.airflow import config
from mnnpipe.airflow.pipelines import artifact_uri, compress_chain, step_operator

# The model this DAG compresses: the digits example. Edit for your model (see dags/README.md).
MODEL_INPUT = {"name": "input", "shape": [1, 1, 8, 8]}
DATA = {"format": "sklearn-digits", "preprocess": {"channels": "GRAY"}}
CALIBRATION = {**DATA, "split": "train", "limit": 64}
EVALUATION = {**DATA, "split": "test"}
STUDENT = "digits_cnn"

ARTIFACTS = config.setting("artifact_prefix") + "/nightly/{{ ds }}"

with DAG(
    dag_id="mnn_nightly_compression",
    schedule="0 2 * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params={
        **config.params(),
        "distill_epochs": Param(20, type="integer", minimum=1, maximum=1000, description="Student training epochs."),
        "student_width": Param(0.5, type="number", exclusiveMinimum=0, maximum=4, description="Student width multiplier."),
    },
    tags=["mnnpipe"],
    doc_md=__doc__,
) as dag:

    @task
    def latest_model() -> dict[str, str]:
        """The newest version in the registry; fails when the registry holds none."""
        from mnnpipe.airflow.registry import list_versions

        registry = config.resolve("model_registry", get_current_context()["params"])
        versions = list_versions(registry, "model.pt")
        if not versions:
            raise FileNotFoundError(f"no model version under {registry} (expected {registry}/<version>/model.pt)")
        return versions[-1].as_dict()

    latest = latest_model()
    distill = step_operator(
        "distill",
        spec={
            "teacher": {"uri": "{{ ti.xcom_pull(task_ids='latest_model')['model_uri'] }}", "format": "torchscript"},
            "student": {"architecture": STUDENT, "width": "{{ params.student_width }}"},
            "dataset": {**DATA, "split": "all"},
            "training": {"epochs": "{{ params.distill_epochs }}", "batch_size": 64, "lr": 0.003},
            "output": f"{ARTIFACTS}/distill",
        },
    )
    steps = compress_chain(
        model_uri=artifact_uri("distill", "model.pt"),
        output=ARTIFACTS,
        model_input=MODEL_INPUT,
        calibration=CALIBRATION,
        evaluation=EVALUATION,
    )
    latest >> distill >> steps[0]
