"""The default recipe: the digits example every orchestrator runs out of the box.

The demo (`mnnpipe demo`), the KFP `compress` pipeline (`pipelines/compress.py`) and the nightly
Airflow DAG all render this one recipe; edit the sizes for your model (see README, "Recipes").
COMPRESS_RECIPE, its steps after training (the Airflow recompression DAG), is built from it.
"""

from __future__ import annotations

import copy
from typing import Any

#: scikit-learn's handwritten digits (real scans shipped with the package), as 1x8x8 images.
DIGITS: dict[str, Any] = {"format": "sklearn-digits", "preprocess": {"channels": "GRAY"}}
INPUT: dict[str, Any] = {"name": "input", "shape": [1, 1, 8, 8]}
#: How a digits CNN state-dict is read: the teacher the demo trains, and the source of the pipeline.
SOURCE_MODEL: dict[str, Any] = {"format": "state-dict", "factory": "mnnpipe.models:digits_cnn"}


def digits(split: str, **extra: Any) -> dict[str, Any]:
    return {**DIGITS, "split": split, **extra}


DEFAULT_RECIPE: dict[str, Any] = {
    "model": SOURCE_MODEL,
    # The benchmark measures the teacher, the student, the pruned model, the fp32 and int8 .mnn.
    "compare": "every-step",
    "distill": {
        "student": {"architecture": "digits_cnn", "width": 0.5},
        "dataset": {**DIGITS},
        "temperature": 4.0,
        "alpha": 0.7,
        "training": {"epochs": 20, "lr": 2e-3, "patience": 6},
    },
    "prune": {
        # distill hands over TorchScript; pruning rewrites nn.Modules, so name the student's class.
        "model": {"factory": "mnnpipe.models:digits_cnn", "factory_kwargs": {"width": 0.5}},
        "input": INPUT,
        "method": "structured",
        "importance": "activation",
        "target": {"by": "channels", "ratio": 0.3},
        "calibration": digits("train", limit=256),
        "finetune": {"dataset": digits("train"), "epochs": 8, "distill": True},
        "evaluation": digits("test"),
    },
    "convert": {"inputs": [INPUT], "samples": digits("test"), "num_samples": 64},
    "quantize": {
        "input": INPUT,
        "mode": "full-int8",
        "calibration": digits("train"),
        "evaluation": digits("test"),
        "calibration_samples": 200,
        "max_accuracy_drop": 1.0,
    },
    "benchmark": {"dataset": digits("test"), "inputs": [INPUT], "threads": [1], "warmup": 10, "iterations": 100, "reference": "convert"},
    # The int8 model's top-1 (measured by the benchmark) within 1 percentage point of the fp32
    # model's (measured by quantize on the same data).
    "gate": {"metric": "candidate/top1", "reference_metric": "fp32_accuracy", "max_drop": 1.0},
}

#: The steps of DEFAULT_RECIPE that need no training, with its sections: convert -> quantize ->
#: benchmark -> gate, for a model that is trained already (the Airflow DAG that recompresses each
#: new model version renders it). The benchmark measures the source, the fp32 .mnn and the int8 one.
COMPRESS_STEPS: tuple[str, ...] = ("convert", "quantize", "benchmark", "gate")
COMPRESS_RECIPE: dict[str, Any] = copy.deepcopy(
    {"model": DEFAULT_RECIPE["model"], "compare": DEFAULT_RECIPE["compare"], **{step: DEFAULT_RECIPE[step] for step in COMPRESS_STEPS}}
)


def demo_search() -> dict[str, Any]:
    """The demo's recipe search: 3 prune ratios x (full int8 | fp32 .mnn) = 6 candidates on the
    default recipe, each measured against the teacher (the benchmark compares the candidate with
    the source only, to keep each measurement short) and gated on the teacher's top-1. All six
    share one distilled student and each prune ratio one fp32 .mnn: 1 distill, 3 prunes and 3
    conversions do the work, the other 9 of those steps come from the cache."""
    base = {**DEFAULT_RECIPE, "compare": "source"}
    base["benchmark"] = {**DEFAULT_RECIPE["benchmark"], "iterations": 50, "reference": "source"}
    base["gate"] = {"metric": "candidate/top1", "reference_metric": "source/top1", "max_drop": 1.5}
    return {
        "base": base,
        # null removes the quantize section: that candidate releases the fp32 .mnn.
        "space": {"prune.target.ratio": [0.2, 0.4, 0.6], "quantize": [DEFAULT_RECIPE["quantize"], None]},
        "sampling": "grid",
        "budget": 6,
        "constraints": {"max_accuracy_drop": 1.5, "min_fidelity": 0.95},
        "objective": {"kind": "smallest"},
    }
