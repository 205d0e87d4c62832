"""Example: how an existing training pipeline hands a new model version to compression.

The contract is small and has two parts:
  1. publish the model at `{model_registry}/{version}/model.pt` (TorchScript), and
  2. emit the Asset `mnnpipe_new_model_version` (`mnnpipe.airflow.config.NEW_MODEL_ASSET`), with
     {"version", "model_uri"} as the event's extra.
`mnn_recompress_on_new_model` is scheduled on that Asset and compresses the version the extra
names with its recipe (`mnnpipe.default_recipe.COMPRESS_RECIPE`: convert -> quantize -> benchmark
-> gate); its hourly run sweeps the registry, so a pipeline outside Airflow that only does (1) is
picked up too. The version name is checked before anything is published: a name the registry
would skip (a run id such as `manual__2026-…+00:00`) fails the task instead.

Here "training" is a tiny CNN on scikit-learn's 8x8 digits (seconds on a CPU), standing in for
whatever your pipeline does (its input shape and data are the recipe's, `mnnpipe.default_recipe`).
Trigger it with {"epochs": 2} or {"model_registry": "s3://..."}.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

from mnnpipe.airflow import config


@dag(
    dag_id="example_training_handoff",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=config.DEFAULT_ARGS,
    user_defined_filters=config.FILTERS,
    params={
        "model_registry": config.params()["model_registry"],
        "epochs": Param(1, type="integer", minimum=1, maximum=100, description="Training epochs."),
    },
    tags=["mnnpipe", "example"],
    doc_md=__doc__,
)
def example_training_handoff():
    @task
    def train_and_publish() -> dict[str, str]:
        """Train, then publish the model under a new version folder (your pipeline's own code)."""
        import tempfile
        from pathlib import Path

        from mnnpipe.data import load_dataset
        from mnnpipe.default_recipe import INPUT, digits
        from mnnpipe.modelio import example_inputs, save_torchscript
        from mnnpipe.models import digits_cnn
        from mnnpipe.registry import check_version
        from mnnpipe.specs import DatasetRef
        from mnnpipe.store import join, store_for
        from mnnpipe.train import FitConfig, accuracy, fit, seed_everything

        context = get_current_context()
        params = context["params"]
        seed_everything(0)
        train = load_dataset(DatasetRef(**digits("train")))
        val = load_dataset(DatasetRef(**digits("val")))
        model = digits_cnn(num_classes=10, width=0.5)
        fit(model, train, FitConfig(epochs=int(params["epochs"]), batch_size=64, lr=3e-3), val=val)
        # A manual trigger has no logical date in Airflow 3; its run_after is always set. Either
        # way the version is a timestamp the registry lists (and orders), never the run id.
        when = context.get("logical_date") or context["dag_run"].run_after
        version = check_version(when.strftime("%Y%m%dT%H%M%S"))
        model_uri = join(config.resolve("model_registry", params), version, config.REGISTRY_MODEL_FILE)
        with tempfile.TemporaryDirectory() as tmp:
            # TorchScript: how the recompression DAG reads the registry (config.REGISTRY_MODEL).
            path = save_torchscript(model, example_inputs([tuple(INPUT["shape"])]), Path(tmp) / config.REGISTRY_MODEL_FILE)
            store_for(model_uri).put(path, model_uri)
        return {"version": version, "model_uri": model_uri, "val_accuracy": f"{accuracy(model, val):.4f}"}

    @task(outlets=[config.NEW_MODEL_ASSET])
    def announce_new_version(published: dict[str, str]) -> None:
        """The hand-off: one Asset event; compression is scheduled on it."""
        outlet_events = get_current_context()["outlet_events"]
        outlet_events[config.NEW_MODEL_ASSET].extra = {"version": published["version"], "model_uri": published["model_uri"]}

    announce_new_version(train_and_publish())


example_training_handoff()
