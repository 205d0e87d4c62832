"""The release gate: publish the candidate model under the release prefix only within budget.

It compares a measured metric of the candidate (e.g. the int8 model's top-1 from the benchmark)
with a reference (e.g. the fp32 model's top-1) and, within budget, publishes the model like any
step output (files, then manifest.json last, under the output lock). That manifest is the marker
recompression looks for: a model version with `released/<name>/<version>/<recipe-digest>/manifest.json`
is not compressed again. With `move_latest`, only after it exists does
`<release_root>/<name>/latest.json` move forward (`after_publish`, called by the runner).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from ..catalog import register
from ..errors import InputError, SpecError, StepFailed
from ..registry import check_version
from ..release import point_latest
from ..specs import ModelRef, StepResult, StepSpec

#: Metric values, by name. A field of this type is a Metrics artifact input for an orchestrator.
MetricValues = dict[str, float]


class Spec(StepSpec):
    """Release the candidate model only when its measured metric is within budget of a reference."""

    kind: Literal["gate"] = "gate"
    candidate: ModelRef = Field(description="The model released when it is within budget (copied under `output`).")
    candidate_metrics: MetricValues = Field(
        default_factory=dict, description="The candidate's measured metrics by name (e.g. the benchmark's metrics)."
    )
    reference_metrics: MetricValues = Field(
        default_factory=dict,
        description="Metrics `reference_metric` is looked up in (e.g. quantize's, with fp32_accuracy); empty: the candidate's.",
    )
    metric: str = Field(
        min_length=1,
        description="Name of the candidate's metric that must stay within budget (a key of candidate_metrics), "
        "e.g. the accuracy of the compressed model, as a 0-1 fraction.",
    )
    reference_metric: str | None = Field(
        None,
        description="Name of the metric it is compared with, looked up in reference_metrics (or candidate_metrics "
        "when those are empty); None: only `min_value` applies.",
    )
    max_drop: float | None = Field(
        1.0,
        ge=0,
        description="Largest allowed reference - metric in percentage points of the 0-1 metric (1.0 = 0.01), "
        "as the steps' max_accuracy_drop.",
    )
    min_value: float | None = Field(None, description="Smallest allowed value of `metric` itself; None: unchecked.")
    higher_is_better: bool = Field(True, description="False for metrics such as error rates, where lower is better.")
    recipe_digest: str = Field("", max_length=64, description="Digest of the recipe that produced the candidate (recorded).")
    move_latest: bool = Field(
        False,
        description="True: `output` is a release `<release_root>/<name>/<version>/<recipe digest>`, and once it is "
        "published `<release_root>/<name>/latest.json` moves forward to it (never back to an older version).",
    )

    @model_validator(mode="after")
    def _budget(self) -> Spec:
        if self.reference_metric is None and self.min_value is None:
            raise ValueError("a gate needs reference_metric (with max_drop) or min_value, else it passes everything")
        if self.reference_metric is not None and self.max_drop is None:
            raise ValueError("reference_metric needs max_drop (the allowed distance from it)")
        if self.move_latest:
            release_layout(self.output)
        return self


class Result(StepResult):
    kind: Literal["gate"] = "gate"
    metric: str = Field(description="The metric the budget applied to.")
    value: float = Field(description="Its measured value for the candidate.")
    reference: float | None = Field(None, description="The reference value it was compared with.")
    drop: float | None = Field(None, description="How much worse than the reference the candidate is, in percentage points (>0: worse).")
    released: str = Field(description="The release prefix the model was published under.")
    source: str = Field(description="The step-store URI of the released model.")
    latest_moved: bool = Field(False, description="True when `<release_root>/<name>/latest.json` now names this release.")


def evaluate(spec: Spec) -> tuple[float, float | None, float | None, list[str]]:
    """(value, reference value, drop in percentage points, problems): the budget check alone, no I/O."""
    candidate, reference = spec.candidate_metrics, spec.reference_metrics
    if spec.metric not in candidate:
        raise InputError(f"candidate_metrics: metric '{spec.metric}' not in the candidate's metrics {sorted(candidate)}")
    value = candidate[spec.metric]
    sign = 1.0 if spec.higher_is_better else -1.0
    problems: list[str] = []
    ref = drop = None
    if spec.reference_metric is not None:
        source = reference or candidate
        if spec.reference_metric not in source:
            raise InputError(f"reference_metrics: reference_metric '{spec.reference_metric}' not in {sorted(source)}")
        ref = source[spec.reference_metric]
        drop = sign * (ref - value) * 100.0
        if not math.isfinite(value) or drop > spec.max_drop + 1e-9:
            problems.append(
                f"{spec.metric} {value:.6g} is {drop:.4g} points worse than {spec.reference_metric} {ref:.6g} (max_drop {spec.max_drop})"
            )
    if spec.min_value is not None and not sign * value >= sign * spec.min_value:
        problems.append(f"{spec.metric} {value:.6g} misses min_value {spec.min_value}")
    return value, ref, drop, problems


def run(spec: Spec, ctx: Any) -> Result:
    value, ref, drop, problems = evaluate(spec)
    if problems:
        raise StepFailed("gate: not released: " + "; ".join(problems))
    local = ctx.local(spec.candidate.uri)  # verified against the producer's manifest
    name = Path(spec.candidate.uri.split("?", 1)[0]).name or local.name
    shutil.copyfile(local, ctx.outdir / name)
    return Result(
        metric=spec.metric,
        value=value,
        reference=ref,
        drop=drop,
        released=spec.output.rstrip("/"),
        source=spec.candidate.uri,
        metrics={"value": value, **({"reference": ref, "drop": drop} if ref is not None else {})},
    )


def release_layout(output: str) -> tuple[str, str, str]:
    """(release root, model name, version) of a release prefix `<root>/<name>/<version>/<digest>`."""
    parts = output.rstrip("/").rsplit("/", 3)
    scheme_in_root = "://" not in output or "://" in parts[0].rstrip("/")[:-1]  # s3://bucket, not 's3:/'
    if len(parts) != 4 or not parts[0] or not scheme_in_root or not all(parts[1:]):
        raise ValueError(f"move_latest needs output '<release_root>/<name>/<version>/<recipe digest>', got '{output}'")
    try:
        check_version(parts[2])
    except SpecError as e:
        raise ValueError(f"move_latest: {e}") from None
    return parts[0], parts[1], parts[2]


def after_publish(spec: Spec, result: Result) -> Result:
    """The release is complete (its manifest exists): only now may `latest` name it."""
    if not spec.move_latest:
        return result
    root, name, version = release_layout(result.released)
    return result.model_copy(update={"latest_moved": point_latest(root, name, version, result.released)})


# The result names the release's own prefix and source (`released`, `source`): a cache hit from
# another version's identical release would publish those stale. Copying one file is cheap.
register(
    name="gate", spec=Spec, result=Result, run=run, stage="release", model_input="candidate",
    cacheable=False, after_publish=after_publish, optional=False,
)
