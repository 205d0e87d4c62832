"""Compress each new model version as soon as it is published, and every version not done yet.

Scheduled on the Asset `mnnpipe_new_model_version` (a training DAG emits it after publishing a
version: see example_training_handoff.py) or every hour, whichever comes first:
- a run started by Asset events compresses the versions those events name (their `extra`:
  {"version", "model_uri"}); the registry is not listed again;
- an hourly (or manual) run sweeps the registry and compresses every version that is not
  processed yet, oldest first, so versions published by pipelines outside Airflow are picked up.
No task waits: a run with nothing to do finishes at once and never holds the DAG's only run slot.
Each version is one instance of the mapped task group `compress`, a rendering of the recipe
`mnnpipe.default_recipe.COMPRESS_RECIPE` (DEFAULT_RECIPE's steps after training): convert ->
quantize (full int8) -> benchmark, publishing to `{artifact_prefix}/versions/{version}/{step}` (a
version's model never changes, so a rerun of it produces the same bytes, served from mnnpipe's
content-addressed cache), then the recipe's release gate, which publishes
`{artifact_prefix}/released/{name}/{version}/{recipe digest}/`, moves
`released/{name}/latest.json` forward and emits the Asset `mnnpipe_compressed_model_released`.
After the group, once every version is done and one was released, the trend step publishes every
release of the model so far (trend.json, trend.html) to `{artifact_prefix}/released/{name}/trend`.
A version is processed once its release manifest exists for this recipe, as in KFP.

Configuration (see mnnpipe.airflow.config): params / Variables / env `model_registry`,
`artifact_prefix`; env MNNPIPE_AIRFLOW_EXECUTION (kubernetes | in_process).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, AssetOrTimeSchedule, CronTriggerTimetable, get_current_context, task, task_group
from airflow.task.trigger_rule import TriggerRule

from mnnpipe.airflow import config
from mnnpipe.airflow.pipelines import pulled, release_task, render_recipe, trend_task
from mnnpipe.default_recipe import COMPRESS_RECIPE
from mnnpipe.recipe import plan
from mnnpipe.release import release_prefix

# What this DAG does to each version: the default recipe's steps after training, its source read
# as the registry holds it. Edit mnnpipe/default_recipe.py (or put your own recipe here).
PLAN = plan(config.registry_recipe(COMPRESS_RECIPE))
GROUP = "compress"

ARTIFACTS = config.setting("artifact_prefix") + "/versions"
VERSION = "{{ %s['version'] }}" % pulled(f"{GROUP}.version")
MODEL_URI = "{{ %s['model_uri'] }}" % pulled(f"{GROUP}.version")
RELEASED = config.setting("artifact_prefix") + "/released"
# The model of this run's versions (one registry: the registry folder's name), for the trend.
NAME = "{{ ((ti.xcom_pull(task_ids='versions_to_compress') or [{}])[0] or {}).get('name') or 'model' }}"

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
            model_filename=config.REGISTRY_MODEL_FILE,
            processed_marker=release_prefix(config.resolve("artifact_prefix", params) + "/released", "{name}", "{version}", PLAN.digest) + "/manifest.json",
        )

    @task_group(group_id=GROUP)
    def compress(found: dict[str, str]) -> None:
        @task(task_id="version")
        def version(found: dict[str, str]) -> dict[str, str]:
            """This instance's version (the specs below pull it from XCom)."""
            return found

        chosen = version(found)
        steps = render_recipe(PLAN, model_uri=MODEL_URI, output=f"{ARTIFACTS}/{VERSION}", group=GROUP)
        chosen >> next(iter(steps.values()))
        release_task(PLAN, steps, found=chosen, release_root=RELEASED)

    compressed = compress.expand(found=versions_to_compress())
    # Once every version's release is done and one of them released (none to do: skipped), the
    # trend of the model's releases. One task after the group: the mapped instances would all
    # write the same trend at once.
    compressed >> trend_task(release_root=RELEASED, name=NAME, trigger_rule=TriggerRule.ALL_DONE_MIN_ONE_SUCCESS)
