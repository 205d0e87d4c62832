"""Nightly: distil the newest model version into a half-width student, prune a quarter of its
channels and fine-tune them back, then convert, quantize to full int8 and benchmark it.

Runs at 02:00 UTC, no catch-up, one run at a time. Takes the newest version under the model
registry (`{model_registry}/{version}/model.pt`, processed or not: nightly re-runs are cheap,
every step serves an identical earlier run from mnnpipe's content-addressed cache) and publishes
each step to `{artifact_prefix}/nightly/{run}/{step}`, where `{run}` is the run id made a safe
path segment: a manual run (which has no logical date in Airflow 3) and the scheduled run of
the same day never write over each other. Then the release gate (the int8 model's top-1 within
MAX_ACCURACY_DROP points of the fp32 model's, as in KFP) publishes
`{artifact_prefix}/released/{name}/{version}/{recipe digest}/`, moves
`released/{name}/latest.json` forward and emits the Asset `mnnpipe_compressed_model_released`.

Configuration (see mnnpipe.airflow.config): params / Variables / env `model_registry`,
`artifact_prefix`; params `distill_epochs`, `finetune_epochs`; env MNNPIPE_AIRFLOW_EXECUTION
(kubernetes | in_process).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Param, get_current_context, task

from mnnpipe.airflow import config
from mnnpipe.airflow.pipelines import artifact_uri, compress_chain, release_task, step_operator
from mnnpipe.airflow.release import recipe_digest

# The model this DAG compresses: the digits example. Edit for your model (see dags/README.md).
MODEL_INPUT = {"name": "input", "shape": [1, 1, 8, 8]}
DATA = {"format": "sklearn-digits", "preprocess": {"channels": "GRAY"}}
CALIBRATION = {**DATA, "split": "train", "limit": 64}
EVALUATION = {**DATA, "split": "test"}
STUDENT = {"architecture": "digits_cnn", "width": 0.5}
# How prune rebuilds the student from the student.pth distill publishes (it needs nn.Modules).
STUDENT_FACTORY = {"factory": "mnnpipe.models:digits_cnn", "factory_kwargs": {"num_classes": 10, "in_channels": 1, "width": 0.5}}
PRUNE_RATIO = 0.25
MAX_ACCURACY_DROP = 1.0  # percentage points of top-1, for quantize and for the release gate
DIGEST = recipe_digest(
    {"student": STUDENT, "prune": PRUNE_RATIO, "input": MODEL_INPUT, "calibration": CALIBRATION, "evaluation": EVALUATION, "max_drop": MAX_ACCURACY_DROP}
)

ARTIFACTS = config.setting("artifact_prefix") + "/nightly/" + config.RUN_SEGMENT

with DAG(
    dag_id="mnn_nightly_compression",
    schedule="0 2 * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=config.DEFAULT_ARGS,
    user_defined_filters=config.FILTERS,
    params={
        **config.params(),
        "distill_epochs": Param(20, type="integer", minimum=1, maximum=1000, description="Student training epochs."),
        "finetune_epochs": Param(3, type="integer", minimum=1, maximum=1000, description="Fine-tuning epochs after pruning."),
    },
    tags=["mnnpipe"],
    doc_md=__doc__,
) as dag:

    @task
    def latest_model() -> dict[str, str]:
        """The newest version in the registry; fails when the registry holds none."""
        from mnnpipe.registry import list_versions

        registry = config.resolve("model_registry", get_current_context()["params"])
        versions = list_versions(registry, "model.pt")
        if not versions:
            from airflow.sdk.exceptions import AirflowFailException

            # Nothing to compress is a configuration problem a retry will not fix.
            raise AirflowFailException(f"no model version under {registry} (expected {registry}/<version>/model.pt)")
        return versions[-1].as_dict()

    latest = latest_model()
    distill = step_operator(
        "distill",
        spec={
            "teacher": {"uri": "{{ ti.xcom_pull(task_ids='latest_model')['model_uri'] }}", "format": "torchscript"},
            "student": STUDENT,
            "dataset": {**DATA, "split": "all"},
            "training": {"epochs": "{{ params.distill_epochs }}", "batch_size": 64, "lr": 0.003},
            "output": f"{ARTIFACTS}/distill",
        },
    )
    prune = step_operator(
        "prune",
        spec={
            "model": {"uri": artifact_uri("distill", "student.pth"), "format": "state-dict", **STUDENT_FACTORY},
            "input": MODEL_INPUT,
            "method": "structured",
            "target": {"ratio": PRUNE_RATIO},
            "finetune": {"dataset": {**DATA, "split": "train"}, "epochs": "{{ params.finetune_epochs }}", "lr": 0.002},
            "evaluation": EVALUATION,
            "output": f"{ARTIFACTS}/prune",
        },
    )
    steps = compress_chain(
        model_uri=artifact_uri("prune", "model.pt"),
        output=ARTIFACTS,
        model_input=MODEL_INPUT,
        calibration=CALIBRATION,
        evaluation=EVALUATION,
        max_accuracy_drop=MAX_ACCURACY_DROP,
    )
    latest >> distill >> prune >> steps[0]
    release_task(
        found=latest,
        quantized=steps[1].output,
        benchmarked=steps[2].output,
        release_root=config.setting("artifact_prefix") + "/released",
        digest=DIGEST,
        max_accuracy_drop=MAX_ACCURACY_DROP,
    )
