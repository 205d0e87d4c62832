"""The release gate on Airflow: the same gate KFP runs (mnnpipe.kfp.gate), fed from XCom.

A compressed version is released only when its int8 model's measured top-1 stays within the
budget of the fp32 model's, both measured by the benchmark on the same data. The release is
published like a step output (files, manifest.json last) under
`{release_root}/{name}/{version}/{recipe digest}/`, then `{release_root}/{name}/latest.json` moves
forward to it (mnnpipe.release), exactly as in KFP. No Airflow import here.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ..registry import check_version

#: Labels the DAGs' benchmark gives the fp32 and int8 models (see pipelines.compress_chain).
FP32_LABEL = "mnn-fp32"
INT8_LABEL = "mnn-int8"


def recipe_digest(recipe: dict[str, Any]) -> str:
    """16 hex digits naming what the DAG does to a model: a changed recipe releases anew."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def release_prefix(release_root: str, name: str, version: str, digest: str) -> str:
    return f"{release_root.rstrip('/')}/{name}/{version}/{digest}"


def gate_spec(max_accuracy_drop_pp: float, digest: str) -> dict[str, Any]:
    """The gate's budget in the units of quantize's `max_accuracy_drop` (percentage points)."""
    return {
        "metric": f"{INT8_LABEL}/top1",
        "reference_metric": f"{FP32_LABEL}/top1",
        "max_drop": max_accuracy_drop_pp / 100.0,  # the gate compares top-1 as a 0-1 fraction
        "recipe_digest": digest,
    }


def gate_and_release(*, found: dict[str, str], quantized: dict[str, Any], benchmarked: dict[str, Any], release_root: str, gate: dict[str, Any]) -> dict[str, Any]:
    """Run the gate on one compressed version; within budget publish the release and move
    `latest.json`. Returns the gate's Result as a dict; StepFailed when over budget."""
    from ..kfp.gate import CANDIDATE, CANDIDATE_METRICS, run_gate
    from ..kfp.launcher import ArtifactRef

    version = check_version(found["version"])
    name = found.get("name") or "model"
    output = release_prefix(release_root, name, version, gate["recipe_digest"])
    metrics = ArtifactRef(uri="", path="", metadata=dict(benchmarked["metrics"]))
    result = run_gate(
        dict(gate, output=output),
        artifacts={CANDIDATE_METRICS: metrics},
        uris={CANDIDATE: quantized["artifacts"]["model.mnn"]["uri"]},
        output_uri=output,
    )
    return result.model_dump(mode="json")
