"""The release gate: publish the compressed model under `released/` only within the accuracy budget.

The gate is the pipeline's last task. It reads a measured metric (from the benchmark's Metrics
artifact), compares it with a reference (a metric of the same or another Metrics artifact, e.g.
the fp32 model's accuracy) and, within budget, copies the model to the release prefix with a
manifest.json written last. That manifest is the marker recompression looks for: a model version
with `released/<name>/<version>/<recipe-digest>/manifest.json` is not compressed again.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from ..errors import InputError, SpecError, StepFailed
from ..release import point_latest
from ..specs import StepResult, StepSpec

GATE = "gate"
CANDIDATE = "candidate"
CANDIDATE_METRICS = "candidate_metrics"
REFERENCE_METRICS = "reference_metrics"


class GateSpec(StepSpec):
    """Release the candidate model only when its measured metric is within budget of a reference."""

    kind: Literal["gate"] = "gate"
    metric: str = Field(
        min_length=1,
        description="Name of the candidate's metric that must stay within budget (a key of the benchmark's Metrics), "
        "e.g. the accuracy of the compressed model.",
    )
    reference_metric: str | None = Field(
        None,
        description="Name of the metric it is compared with, looked up in the reference Metrics (or the candidate's "
        "when no reference is connected); None: only `min_value` applies.",
    )
    max_drop: float | None = Field(
        0.01,
        ge=0,
        description="Largest allowed reference - metric, in the metric's own unit (0.01 = one point of a 0-1 accuracy).",
    )
    min_value: float | None = Field(None, description="Smallest allowed value of `metric` itself; None: unchecked.")
    higher_is_better: bool = Field(True, description="False for metrics such as latency or error, where lower is better.")
    recipe_digest: str = Field("", max_length=64, description="Digest of the recipe that produced the candidate (recorded).")

    @model_validator(mode="after")
    def _budget(self) -> GateSpec:
        if self.reference_metric is None and self.min_value is None:
            raise ValueError("a gate needs reference_metric (with max_drop) or min_value, else it passes everything")
        if self.reference_metric is not None and self.max_drop is None:
            raise ValueError("reference_metric needs max_drop (the allowed distance from it)")
        return self


class GateResult(StepResult):
    kind: Literal["gate"] = "gate"
    metric: str = Field(description="The metric the budget applied to.")
    value: float = Field(description="Its measured value for the candidate.")
    reference: float | None = Field(None, description="The reference value it was compared with.")
    drop: float | None = Field(None, description="How much worse than the reference the candidate is (>0: worse).")
    released: str = Field(description="The release prefix the model was published under.")
    source: str = Field(description="The step-store URI of the released model.")
    latest_moved: bool = Field(False, description="True when `<release_root>/<name>/latest.json` now names this release.")


def parse_gate_spec(data: dict[str, Any]) -> GateSpec:
    from ..runner import format_validation_error

    try:
        return GateSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(f"gate.{format_validation_error(e)}") from None


def _metrics_of(artifact: Any, label: str) -> dict[str, float]:
    if artifact is None:
        return {}
    values = {k: v for k, v in (artifact.metadata or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not values and Path(artifact.path).is_file():  # a Metrics file written by a container component
        try:
            values = json.loads(Path(artifact.path).read_text())
        except ValueError:
            raise InputError(f"{label}: {artifact.path} is not a JSON object of metrics") from None
    return {k: float(v) for k, v in values.items()}


def evaluate(spec: GateSpec, candidate: dict[str, float], reference: dict[str, float]) -> tuple[float, float | None, float | None, list[str]]:
    """(value, reference value, drop, problems): the budget check alone, no I/O."""
    if spec.metric not in candidate:
        raise InputError(f"gate: metric '{spec.metric}' not in the candidate's metrics {sorted(candidate)}")
    value = candidate[spec.metric]
    sign = 1.0 if spec.higher_is_better else -1.0
    problems: list[str] = []
    ref = drop = None
    if spec.reference_metric is not None:
        source = reference or candidate
        if spec.reference_metric not in source:
            raise InputError(f"gate: reference_metric '{spec.reference_metric}' not in {sorted(source)}")
        ref = source[spec.reference_metric]
        drop = sign * (ref - value)
        if not math.isfinite(value) or drop > spec.max_drop + 1e-12:
            problems.append(f"{spec.metric} {value:.6g} is {drop:.6g} worse than {spec.reference_metric} {ref:.6g} (max_drop {spec.max_drop})")
    if spec.min_value is not None and not sign * value >= sign * spec.min_value:
        problems.append(f"{spec.metric} {value:.6g} misses min_value {spec.min_value}")
    return value, ref, drop, problems


def run_gate(spec_json: str | dict[str, Any], *, artifacts: dict[str, Any], uris: dict[str, str], output_uri: str) -> GateResult:
    """Check the budget; within it, publish the candidate under the release prefix (manifest last)."""
    from ..runner import _now, publish
    from ..store import fetch, sha256_file
    from .launcher import input_uri

    data = json.loads(spec_json) if isinstance(spec_json, str) else dict(spec_json)
    if output_uri:
        data["output"] = output_uri
    spec = parse_gate_spec(data)
    started = _now()
    value, ref, drop, problems = evaluate(
        spec,
        _metrics_of(artifacts.get(CANDIDATE_METRICS), CANDIDATE_METRICS),
        _metrics_of(artifacts.get(REFERENCE_METRICS), REFERENCE_METRICS),
    )
    if problems:
        raise StepFailed("gate: not released: " + "; ".join(problems))
    candidate = artifacts.get(CANDIDATE)
    source = input_uri(candidate) if candidate is not None else uris.get(CANDIDATE, "")
    if not source:
        raise InputError("gate: no candidate model connected")
    with tempfile.TemporaryDirectory(prefix="mnnpipe-gate-") as tmp:
        local = fetch(source, Path(tmp) / "in")  # verified against the producer's manifest
        outdir = Path(tmp) / "out"
        outdir.mkdir()
        name = Path(source.split("?", 1)[0]).name or "model"
        shutil.copyfile(local, outdir / name)
        result = GateResult(
            metric=spec.metric, value=value, reference=ref, drop=drop, released=spec.output.rstrip("/"), source=source,
            metrics={"value": value, **({"reference": ref, "drop": drop} if ref is not None else {})},
        )
        digests = {source: sha256_file(local)}
        key = json.dumps({"gate": spec.model_dump(mode="json"), "inputs": digests}, sort_keys=True)
        import hashlib

        published = publish(GATE, spec, result, outdir, digests, hashlib.sha256(key.encode()).hexdigest(), started)
    # The release is complete (manifest written last); only now may `latest` name it.
    parts = published.released.rsplit("/", 3)  # <release_root>/<name>/<version>/<recipe digest>
    if len(parts) != 4 or "://" in parts[1]:
        return published
    root, name, version, _digest = parts
    return published.model_copy(update={"latest_moved": point_latest(root, name, version, published.released)})
