"""A user's own KFP pipeline: their training component, then mnnpipe's components through the
importable API (used by test_kfp_pipeline.py; written the way a user writes it)."""

import json

from kfp import dsl

from mnnpipe.kfp import components

DIGITS = {"format": "sklearn-digits", "preprocess": {"channels": "GRAY"}}
CONVERT = {"model": {"format": "torchscript"}, "inputs": [{"name": "input", "shape": [1, 1, 8, 8]}]}
QUANTIZE = {
    "model": {"format": "mnn"},
    "input": {"name": "input", "shape": [1, 1, 8, 8]},
    "calibration": {**DIGITS, "split": "train", "limit": 64},
    "evaluation": {**DIGITS, "split": "test", "limit": 100},
    "calibration_samples": 64,
}

BENCHMARK = {
    "models": [{"label": "fp32", "model": {"format": "mnn"}}, {"label": "int8", "model": {"format": "mnn"}}],
    "dataset": {**DIGITS, "split": "test", "limit": 100},
    "threads": [1],
    "batch_sizes": [1],
    "warmup": 1,
    "iterations": 3,
    "reference": "fp32",
}


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def train_digits(registry: str) -> str:
    """The user's own training: a tiny digits CNN, published as TorchScript; returns its URI."""
    import tempfile
    from pathlib import Path

    from mnnpipe.data import load_dataset
    from mnnpipe.modelio import example_inputs, save_torchscript
    from mnnpipe.models import digits_cnn
    from mnnpipe.specs import DatasetRef
    from mnnpipe.store import join, store_for
    from mnnpipe.train import FitConfig, fit, seed_everything

    seed_everything(0)
    data = load_dataset(DatasetRef(format="sklearn-digits", split="train", limit=256, preprocess={"channels": "GRAY"}))
    model = digits_cnn(num_classes=10, width=0.5)
    fit(model, data, FitConfig(epochs=1, batch_size=64, lr=3e-3))
    uri = join(registry, "1", "model.pt")
    with tempfile.TemporaryDirectory() as tmp:
        store_for(uri).put(save_torchscript(model, example_inputs([(1, 1, 8, 8)]), Path(tmp) / "model.pt"), uri)
    return uri


def make_pipeline(s3_endpoint: str = ""):
    """The pipeline; `s3_endpoint` is where the cluster's pods reach S3 (none: the environment's)."""

    @dsl.pipeline(name="users-own")
    def users_pipeline(registry: str, outputs: str):
        trained = train_digits(registry=registry).set_caching_options(False)
        converted = components.convert(spec=json.dumps(CONVERT), num_samples=4, model_uri=trained.output, output_uri=f"{outputs}/convert")
        quantized = components.quantize(
            spec=json.dumps(QUANTIZE), max_accuracy_drop=10.0, model=converted.outputs["output_model"], output_uri=f"{outputs}/quantize"
        )
        # fp32 and int8 measured side by side: one Model artifact per item of the benchmark's models
        measured = components.benchmark(
            spec=json.dumps(BENCHMARK),
            models_item0=converted.outputs["output_model"],
            models_item1=quantized.outputs["output_model"],
            output_uri=f"{outputs}/benchmark",
        )
        for task in (converted, quantized, measured):
            components.use_s3(task, secret_name="mnnpipe-s3", endpoint_url=s3_endpoint)

    return users_pipeline
