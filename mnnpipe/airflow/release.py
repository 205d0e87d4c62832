"""The release gate on Airflow: the `gate` step (mnnpipe.steps.gate), fed from XCom.

A compressed version is released only when its int8 model's measured top-1 stays within the
budget of the fp32 model's, both measured by the benchmark on the same data. The release is
published like a step output (files, manifest.json last) under
`{release_root}/{name}/{version}/{recipe digest}/`, then `{release_root}/{name}/latest.json` moves
forward to it (the step's `after_publish`), exactly as in KFP. No Airflow import here.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ..registry import check_version
from ..release import release_prefix

#: Labels the DAGs' benchmark gives the fp32 and int8 models (see pipelines.compress_chain).
FP32_LABEL = "mnn-fp32"
INT8_LABEL = "mnn-int8"


def recipe_digest(recipe: dict[str, Any]) -> str:
    """16 hex digits naming what the DAG does to a model: a changed recipe releases anew."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def gate_spec(max_accuracy_drop_pp: float, digest: str) -> dict[str, Any]:
    """The gate's budget, in the units of quantize's `max_accuracy_drop` (percentage points)."""
    return {
        "metric": f"{INT8_LABEL}/top1",
        "reference_metric": f"{FP32_LABEL}/top1",
        "max_drop": max_accuracy_drop_pp,
        "recipe_digest": digest,
        "move_latest": True,
    }


def gate_and_release(*, found: dict[str, str], quantized: dict[str, Any], benchmarked: dict[str, Any], release_root: str, gate: dict[str, Any]) -> dict[str, Any]:
    """Run the gate step on one compressed version; within budget it publishes the release and
    moves `latest.json`. Returns the gate's Result as a dict; StepFailed when over budget."""
    from ..runner import run_step

    version = check_version(found["version"])
    name = found.get("name") or "model"
    spec = {
        **gate,
        "candidate": {"uri": quantized["artifacts"]["model.mnn"]["uri"]},
        "candidate_metrics": dict(benchmarked["metrics"]),
        "output": release_prefix(release_root, name, version, gate["recipe_digest"]),
    }
    return run_step("gate", spec, quiet=True).model_dump(mode="json")
