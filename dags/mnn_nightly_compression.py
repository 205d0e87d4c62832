"""Nightly: the default recipe (`mnnpipe.default_recipe.DEFAULT_RECIPE`) on the newest model
version: distil it into a half-width student, prune its channels and fine-tune them back, then
convert, quantize to full int8, benchmark, and release it through the recipe's gate.

Runs at 02:00 UTC, no catch-up, one run at a time. Takes the newest version under the model
registry (`{model_registry}/{version}/model.pt`, TorchScript; processed or not: nightly re-runs
are cheap, every step serves an identical earlier run from mnnpipe's content-addressed cache) and
publishes each step to `{artifact_prefix}/nightly/{run}/{step}`, where `{run}` is the run id made
a safe path segment: a manual run (which has no logical date in Airflow 3) and the scheduled run
of the same day never write over each other. The tasks, their order, their specs and the release
gate are a rendering of the recipe (`mnnpipe.airflow.pipelines.render_recipe`, the same plan KFP
and `mnnpipe demo` run); the gate publishes `{artifact_prefix}/released/{name}/{version}/{recipe
digest}/`, moves `released/{name}/latest.json` forward and emits the Asset
`mnnpipe_compressed_model_released`; then the trend step publishes every release of the model so
far (trend.json, trend.html, regressions flagged) to `{artifact_prefix}/released/{name}/trend`.

Configuration (see mnnpipe.airflow.config): params / Variables / env `model_registry`,
`artifact_prefix`; params `distill_epochs`, `finetune_epochs` (their defaults are the recipe's);
env MNNPIPE_AIRFLOW_EXECUTION (kubernetes | in_process).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Param

from mnnpipe.airflow import config
from mnnpipe.airflow.pipelines import latest_model_task, model_name, pulled, release_task, render_recipe, trend_task
from mnnpipe.default_recipe import DEFAULT_RECIPE
from mnnpipe.recipe import parse_recipe, plan

# What this DAG does to a model: the default recipe, its source read as the registry holds it.
# Edit mnnpipe/default_recipe.py (or put your own recipe here) for your model; see dags/README.md.
RECIPE = parse_recipe(config.registry_recipe(DEFAULT_RECIPE))
PLAN = plan(RECIPE)
# Run params written over the recipe's values (their defaults are the recipe's own).
TEMPLATES = {"distill.training.epochs": "{{ params.distill_epochs }}", "prune.finetune.epochs": "{{ params.finetune_epochs }}"}

ARTIFACTS = config.setting("artifact_prefix") + "/nightly/" + config.RUN_SEGMENT
MODEL_URI = "{{ %s['model_uri'] }}" % pulled("latest_model")
RELEASED = config.setting("artifact_prefix") + "/released"

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
        "distill_epochs": Param(RECIPE.distill.training.epochs, type="integer", minimum=1, maximum=1000, description="Student training epochs."),
        "finetune_epochs": Param(RECIPE.prune.finetune.epochs, type="integer", minimum=1, maximum=1000, description="Fine-tuning epochs after pruning."),
    },
    tags=["mnnpipe"],
    doc_md=__doc__,
) as dag:

    latest = latest_model_task()
    steps = render_recipe(PLAN, model_uri=MODEL_URI, output=ARTIFACTS, templates=TEMPLATES)
    latest >> next(iter(steps.values()))
    released = release_task(PLAN, steps, found=latest, release_root=RELEASED)
    released >> trend_task(release_root=RELEASED, name=model_name("latest_model"))
