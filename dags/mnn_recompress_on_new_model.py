"""Compress each new model version as soon as it is published.

Scheduled on the Asset `mnnpipe_new_model_version` (a training DAG emits it after publishing a
version: see example_training_handoff.py) or every hour, whichever comes first, so versions
published by pipelines outside Airflow are picked up too. The first task, a deferrable sensor,
finds the newest version under the model registry that has not been compressed yet (its
benchmark manifest does not exist); it waits in the triggerer, without a worker slot, for up to
`SENSOR_TIMEOUT` and is then skipped. Each step publishes to
`{artifact_prefix}/versions/{version}/{step}`.

Configuration (see mnnpipe.airflow.config): params / Variables / env `model_registry`,
`artifact_prefix`; env MNNPIPE_AIRFLOW_EXECUTION (kubernetes | in_process).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, AssetOrTimeSchedule, CronTriggerTimetable

from mnnpipe.airflow import config
from mnnpipe.airflow.pipelines import compress_chain
from mnnpipe.registry import default_marker
from mnnpipe.airflow.sensors import MnnNewModelVersionSensor

# The model this DAG compresses: the digits example. Edit for your model (see dags/README.md).
MODEL_INPUT = {"name": "input", "shape": [1, 1, 8, 8]}
DATA = {"format": "sklearn-digits", "preprocess": {"channels": "GRAY"}}
CALIBRATION = {**DATA, "split": "train", "limit": 64}
EVALUATION = {**DATA, "split": "test"}
SENSOR_TIMEOUT = 55 * 60  # below the hourly schedule: one waiting sensor at a time

ARTIFACTS = config.setting("artifact_prefix") + "/versions"
FOUND = "ti.xcom_pull(task_ids='wait_for_new_model')"

with DAG(
    dag_id="mnn_recompress_on_new_model",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 * * * *", timezone="UTC"), assets=config.NEW_MODEL_ASSET),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params=config.params(),
    tags=["mnnpipe"],
    doc_md=__doc__,
) as dag:
    steps = compress_chain(
        model_uri="{{ %s['model_uri'] }}" % FOUND,
        output=ARTIFACTS + "/{{ %s['version'] }}" % FOUND,
        model_input=MODEL_INPUT,
        calibration=CALIBRATION,
        evaluation=EVALUATION,
    )
    wait = MnnNewModelVersionSensor(
        task_id="wait_for_new_model",
        registry=config.setting("model_registry"),
        processed_marker=default_marker(ARTIFACTS, steps[-1].step),  # its manifest is published last
        poke_interval=60,
        timeout=SENSOR_TIMEOUT,
        soft_fail=True,
    )
    wait >> steps[0]
