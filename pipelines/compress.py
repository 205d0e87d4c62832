"""The `compress` pipeline with the default recipe (digits demo sizes; override per model).

    python pipelines/compress.py            # compile -> pipelines/compress.yaml (same as generate)
    python -m mnnpipe.kfp.generate          # regenerate every component.yaml and compress.yaml

The step image is one setting: `compress_pipeline(image=...)`, else $MNNPIPE_IMAGE, else the
package's tag; the compiled description says how a release pins it (tag and digest).

Step order: [distill] -> [prune] -> convert -> [quantize] -> [benchmark] -> gate. Convert runs
before quantize because MNN's int8 quantizer needs the fp32 .mnn the converter makes.
"""

from __future__ import annotations

import sys

DIGITS = {"format": "sklearn-digits", "preprocess": {"channels": "GRAY"}}

DEFAULT_RECIPE = {
    "model": {"format": "state-dict", "factory": "mnnpipe.models:digits_cnn"},
    "distill": {
        "student": {"architecture": "digits_cnn", "width": 0.5},
        "dataset": {**DIGITS, "split": "all"},
        "training": {"epochs": 20, "batch_size": 64, "patience": 3},
    },
    "prune": {
        # distill hands over TorchScript; pruning rewrites nn.Modules, so name the student's class.
        "model": {"factory": "mnnpipe.models:digits_cnn", "factory_kwargs": {"width": 0.5}},
        "input": {"name": "input", "shape": [1, 1, 8, 8]},
        "target": {"by": "channels", "ratio": 0.3},
        "finetune": {"dataset": {**DIGITS, "split": "train"}, "epochs": 5, "distill": True},
        "evaluation": {**DIGITS, "split": "test"},
    },
    "convert": {"inputs": [{"name": "input", "shape": [1, 1, 8, 8]}]},
    "quantize": {
        "input": {"name": "input", "shape": [1, 1, 8, 8]},
        "calibration": {**DIGITS, "split": "train", "limit": 256},
        "evaluation": {**DIGITS, "split": "test"},
        "max_accuracy_drop": 1.0,
    },
    "benchmark": {"dataset": {**DIGITS, "split": "test"}, "threads": [1, 2]},
    "gate": {"metric": "candidate/top1", "reference_metric": "fp32_accuracy", "max_drop": 1.0},  # percentage points of top-1
}

PIPELINE_DEFAULTS = {
    "model_uri": "s3://models/digits/1/model.pth",
    "model_name": "digits",
    "model_version": "1",
    "store_prefix": "s3://mnnpipe/runs",
    "release_root": "s3://mnnpipe/released",
}


def compress_pipeline(**overrides):
    from mnnpipe.kfp.pipeline import build_pipeline

    return build_pipeline(DEFAULT_RECIPE, **{**PIPELINE_DEFAULTS, **overrides})


if __name__ == "__main__":
    from mnnpipe.kfp.pipeline import compile_pipeline

    compile_pipeline(compress_pipeline(), sys.argv[1] if len(sys.argv) > 1 else "pipelines/compress.yaml")
