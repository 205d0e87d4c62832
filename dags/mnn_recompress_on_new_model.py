"""Compress each new model version as soon as it is published, and every version not done yet.

Scheduled on the Asset `mnnpipe_new_model_version` (a training DAG emits it after publishing a
version: see example_training_handoff.py) or every hour, whichever comes first:
- a run started by Asset events compresses the versions those events name (their `extra`:
  {"version", "model_uri"}); the registry is not listed again;
- an hourly (or manual) run sweeps the registry and compresses every version that is not
  processed yet, oldest first, so versions published by pipelines outside Airflow are picked up.
No task waits: a run with nothing to do finishes at once and never holds the DAG's only run slot.
Each version is one instance of the mapped task group `compress`: convert -> quantize (full
int8) -> benchmark, publishing to `{artifact_prefix}/versions/{version}/{step}` (a version's model
never changes, so a rerun of it produces the same bytes, served from mnnpipe's content-addressed
cache), then the release gate (the int8 model's top-1 within MAX_ACCURACY_DROP points of the fp32
model's), which publishes `{artifact_prefix}/released/{name}/{version}/{recipe digest}/`, moves
`released/{name}/latest.json` forward and emits the Asset `mnnpipe_compressed_model_released`.
A version is processed once its release manifest exists for this recipe, as in KFP.

Configuration (see mnnpipe.airflow.config): params / Variables / env `model_registry`,
`artifact_prefix`; env MNNPIPE_AIRFLOW_EXECUTION (kubernetes | in_process).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, AssetOrTimeSchedule, CronTriggerTimetable, get_current_context, task, task_group

from mnnpipe.airflow import config
from mnnpipe.airflow.pipelines import compress_chain, pulled, release_task
from mnnpipe.airflow.release import recipe_digest
from mnnpipe.release import release_prefix

# The model this DAG compresses: the digits example. Edit for your model (see dags/README.md).
MODEL_INPUT = {"name": "input", "shape": [1, 1, 8, 8]}
DATA = {"format": "sklearn-digits", "preprocess": {"channels": "GRAY"}}
CALIBRATION = {**DATA, "split": "train", "limit": 64}
EVALUATION = {**DATA, "split": "test"}
MAX_ACCURACY_DROP = 1.0  # percentage points of top-1, for quantize and for the release gate
DIGEST = recipe_digest({"input": MODEL_INPUT, "calibration": CALIBRATION, "evaluation": EVALUATION, "max_drop": MAX_ACCURACY_DROP})

ARTIFACTS = config.setting("artifact_prefix") + "/versions"
VERSION = "{{ %s['version'] }}" % pulled("compress.version")
MODEL_URI = "{{ %s['model_uri'] }}" % pulled("compress.version")

with DAG(
    dag_id="mnn_recompress_on_new_model",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 * * * *", timezone="UTC"), assets=config.NEW_MODEL_ASSET),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=config.DEFAULT_ARGS,
    user_defined_filters=config.FILTERS,
    params=config.params(),
    tags=["mnnpipe"],
    doc_md=__doc__,
) as dag:

    @task
    def versions_to_compress() -> list[dict[str, str]]:
        """The versions the triggering Asset events name, else every unprocessed one in the registry."""
        from mnnpipe.airflow.handoff import versions_to_compress as pick

        context = get_current_context()
        params = context["params"]
        return pick(
            events=(context.get("triggering_asset_events") or {}).get(config.NEW_MODEL_ASSET, []),
            registry=config.resolve("model_registry", params),
            processed_marker=release_prefix(config.resolve("artifact_prefix", params) + "/released", "{name}", "{version}", DIGEST) + "/manifest.json",
        )

    @task_group(group_id="compress")
    def compress(found: dict[str, str]) -> None:
        @task(task_id="version")
        def version(found: dict[str, str]) -> dict[str, str]:
            """This instance's version (the specs below pull it from XCom)."""
            return found

        steps = compress_chain(
            model_uri=MODEL_URI,
            output=f"{ARTIFACTS}/{VERSION}",
            model_input=MODEL_INPUT,
            calibration=CALIBRATION,
            evaluation=EVALUATION,
            max_accuracy_drop=MAX_ACCURACY_DROP,
            group="compress",
        )
        chosen = version(found)
        chosen >> steps[0]
        release_task(
            found=chosen,
            quantized=steps[1].output,
            benchmarked=steps[2].output,
            release_root=config.setting("artifact_prefix") + "/released",
            digest=DIGEST,
            max_accuracy_drop=MAX_ACCURACY_DROP,
        )

    compress.expand(found=versions_to_compress())
