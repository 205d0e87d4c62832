"""Recipe search, triggered by hand: the demo search (`mnnpipe.default_recipe.demo_search`) on the
newest model version. Six candidates of the default recipe (prune ratio 0.2 | 0.4 | 0.6, each
quantized to full int8 or left as the fp32 .mnn) each run as one map index of a mapped task group,
a normal chain of step tasks; `select` judges every candidate (failed ones included) on the real
.mnn's size, latency, accuracy and fidelity and chooses the smallest within the constraints; the
gate releases it and the trend step reports the model's releases.

The space switches quantize on and off, so the candidates run two chains of steps: mapped group
`candidates_1` (distill -> prune -> convert -> quantize -> benchmark, the int8 candidates) and
`candidates_2` (without quantize). Map index i of a group is its i-th candidate; each instance's
label in the UI is the candidate id (c00...c05, as `mnnpipe search` and the KFP pipeline name them).
Candidates share prefixes through mnnpipe's content-addressed cache (one distilled student for
all six, one fp32 .mnn per prune ratio); `select`'s XCom counts the steps served so.

Publishes each candidate's steps to `{artifact_prefix}/search/{run}/candidates/{candidate}/{step}`,
the selection (metrics.json with every candidate, report.html with the Pareto plot) to
`{artifact_prefix}/search/{run}/select`, the release to `{artifact_prefix}/released/{name}/{version}/
{search digest}/` (moving `released/{name}/latest.json` forward and emitting the Asset
`mnnpipe_compressed_model_released`) and the trend to `{artifact_prefix}/released/{name}/trend`.
When no candidate meets the constraints, `select` fails naming the closest ones and nothing is released.

Configuration (see mnnpipe.airflow.config): params / Variables / env `model_registry`,
`artifact_prefix`; params `distill_epochs`, `finetune_epochs`, `benchmark_iterations` (written
over every candidate; their defaults are the search's); env MNNPIPE_AIRFLOW_EXECUTION
(kubernetes | in_process).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Param

from mnnpipe.airflow import config
from mnnpipe.airflow.pipelines import latest_model_task, model_name, pulled
from mnnpipe.airflow.search import render_search
from mnnpipe.default_recipe import demo_search

# What this DAG searches: the demo search, its base recipe reading the source model as the
# registry holds it. Put your own search spec here (base recipe, space, constraints, objective).
SEARCH = demo_search()
SEARCH["base"] = config.registry_recipe(SEARCH["base"])
BASE = SEARCH["base"]
# Run params written over every candidate's values (their defaults are the search's own).
TEMPLATES = {
    "distill.training.epochs": "{{ params.distill_epochs }}",
    "prune.finetune.epochs": "{{ params.finetune_epochs }}",
    "benchmark.iterations": "{{ params.benchmark_iterations }}",
}

ARTIFACTS = config.setting("artifact_prefix") + "/search/" + config.RUN_SEGMENT
RELEASED = config.setting("artifact_prefix") + "/released"
# latest_model is not mapped: the candidates' tasks (map index 0, 1...) pull its one value.
MODEL_URI = "{{ %s['model_uri'] }}" % pulled("latest_model", same_index=False)
VERSION = "{{ %s['version'] }}" % pulled("latest_model", same_index=False)
NAME = model_name("latest_model", same_index=False)

with DAG(
    dag_id="mnn_recipe_search",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=config.DEFAULT_ARGS,
    user_defined_filters=config.FILTERS,
    params={
        **config.params(),
        "distill_epochs": Param(BASE["distill"]["training"]["epochs"], type="integer", minimum=1, maximum=1000, description="Student training epochs (every candidate)."),
        "finetune_epochs": Param(BASE["prune"]["finetune"]["epochs"], type="integer", minimum=1, maximum=1000, description="Fine-tuning epochs after pruning (every candidate)."),
        "benchmark_iterations": Param(BASE["benchmark"]["iterations"], type="integer", minimum=1, maximum=100000, description="Timed benchmark iterations per candidate."),
    },
    tags=["mnnpipe"],
    doc_md=__doc__,
) as dag:
    latest = latest_model_task()
    search = render_search(SEARCH, model_uri=MODEL_URI, output=ARTIFACTS, release_root=RELEASED, name=NAME, version=VERSION, templates=TEMPLATES)
    latest >> list(search.groups.values())
