"""Choose among a search's measured candidates: the constraints, the Pareto front, the objective.

Each candidate is a recipe the orchestrator ran to the end (KFP ParallelFor, Airflow .expand or
one after another here): its compressed model and the numbers its benchmark measured on the real
.mnn in MNN's runtime. This step judges them with `mnnpipe.search.select`, hands the chosen model
on (model.mnn) for the release gate, and publishes metrics.json (every candidate, the front, the
choice and why), report.html (the Pareto plot and a table) and report.md. When no candidate meets
the constraints it fails (exit 1) naming the closest ones: nothing is handed on, nothing released.
"""

from __future__ import annotations

import json
import shutil
from typing import Any, Literal

from pydantic import Field, model_validator

from ..catalog import HandOff, register
from ..errors import InputError, StepFailed
from ..search.report import metrics_json, render_html, render_markdown
from ..search.select import CandidateMetrics, Selection, select
from ..search.spec import Constraints, Objective
from ..specs import ModelRef, StepResult, StepSpec, Strict

#: Metric values, by name (a Metrics artifact for an orchestrator).
MetricValues = dict[str, float]


class MeasuredCandidate(Strict):
    """One candidate as its run left it."""

    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="The candidate's id (c00, c01, ...).")
    overrides: dict[str, Any] = Field(default_factory=dict, description="The recipe values this candidate set, by dotted path.")
    recipe_digest: str = Field("", max_length=64, description="Digest of the candidate's complete recipe.")
    model: ModelRef | None = Field(None, description="The candidate's compressed model; None when its run failed.")
    metrics: MetricValues = Field(default_factory=dict, description="What its measuring step (the benchmark) measured.")
    reference_metrics: MetricValues = Field(default_factory=dict, description="Its model step's own metrics (e.g. quantize's fp32_accuracy).")
    error: str | None = Field(None, max_length=2000, description="Why its run failed (one line).")


class MetricNames(Strict):
    """Which measured numbers are the candidate's size, latency, accuracy and fidelity (the
    benchmark's `<label>/<metric>` names; a recipe's benchmark labels its model `candidate` and
    the source model `source`)."""

    latency_p50: str = Field("candidate/t1_b1/p50_ms", description="Median latency in ms (the benchmark's threads/batch setting in the name).")
    latency_p90: str = Field("candidate/t1_b1/p90_ms", description="90th percentile latency in ms.")
    accuracy: str = Field("candidate/top1", description="The candidate's accuracy, 0-1.")
    reference_accuracy: str = Field("source/top1", description="The uncompressed source model's accuracy, 0-1.")
    fidelity: str = Field("candidate/cosine", description="Cosine similarity of the candidate's outputs to the reference model's.")


class Spec(StepSpec):
    """Choose the best measured candidate of a recipe search within its constraints."""

    kind: Literal["select"] = "select"
    candidates: list[MeasuredCandidate] = Field(min_length=1, max_length=1000, description="Every candidate the search ran.")
    constraints: Constraints = Field(default_factory=Constraints, description="What the chosen candidate must meet.")
    objective: Objective = Field(default_factory=Objective, description="How the chosen candidate is picked among the feasible ones (smallest, fastest, most accurate, weighted).")
    metric_names: MetricNames = Field(default_factory=MetricNames, description="Where each judged number is among the candidates' metrics.")
    title: str = Field("recipe search", max_length=200, description="Title of the report.")
    ids_in_uris: bool = Field(
        False,
        description="True: each candidate's model URI must hold its id as a path segment, so a fan-in that mixed up "
        "the candidates' order fails instead of mislabelling them (the KFP search pipeline sets it).",
    )

    @model_validator(mode="after")
    def _unique(self) -> Spec:
        ids = [c.id for c in self.candidates]
        if len(set(ids)) != len(ids):
            raise ValueError(f"candidate ids must be unique, got {sorted({i for i in ids if ids.count(i) > 1})} more than once")
        return self


class Result(StepResult):
    kind: Literal["select"] = "select"
    chosen: str = Field(description="Id of the chosen candidate.")
    reason: str = Field(description="Why it was chosen, with its numbers.")
    front: list[str] = Field(description="Ids on the Pareto front of size, median latency and accuracy.")
    feasible: list[str] = Field(description="Ids of the candidates that meet every constraint.")
    chosen_overrides: dict[str, Any] = Field(default_factory=dict, description="The recipe values the chosen candidate set.")
    chosen_recipe_digest: str = Field("", description="Digest of the chosen candidate's recipe.")
    source: str = Field(description="The chosen model's URI in the step store.")
    candidates: list[CandidateMetrics] = Field(description="Every candidate's judged numbers.")


def measured(c: MeasuredCandidate, names: MetricNames, size_bytes: int | None) -> CandidateMetrics:
    """The judged numbers of one candidate (a failed run keeps its error)."""
    m = c.metrics
    ok = c.model is not None and c.error is None
    return CandidateMetrics(
        id=c.id,
        overrides=c.overrides,
        recipe_digest=c.recipe_digest,
        model_uri=c.model.uri if c.model is not None else "",
        size_bytes=size_bytes,
        latency_ms_p50=m.get(names.latency_p50),
        latency_ms_p90=m.get(names.latency_p90),
        accuracy=m.get(names.accuracy),
        reference_accuracy=m.get(names.reference_accuracy),
        fidelity=m.get(names.fidelity),
        status="ok" if ok else "failed",
        error=None if ok else (c.error or "no model was produced"),
    )


def run(spec: Spec, ctx: Any) -> Result:
    judged: list[CandidateMetrics] = []
    for i, c in enumerate(spec.candidates):
        if spec.ids_in_uris and c.model is not None and c.id not in c.model.uri.split("?", 1)[0].split("/"):
            raise InputError(f"candidates.{i}.model: {c.model.uri} is not candidate {c.id}'s output (the fan-in mixed up the order)")
        # Bytes on disk, not a reported number: the size the device will download.
        size = ctx.local(c.model.uri).stat().st_size if c.model is not None and c.error is None else None
        judged.append(measured(c, spec.metric_names, size))
    selection: Selection = select(judged, spec.constraints, spec.objective)
    if selection.chosen is None:
        closest = "; ".join(f"{x.id} ({', '.join(x.violations)})" for x in selection.closest)
        raise StepFailed(f"select: no candidate of {len(judged)} meets the constraints; closest: {closest}")
    chosen = next(c for c in spec.candidates if c.id == selection.chosen)
    local = ctx.local(chosen.model.uri)
    if local.suffix != ".mnn":
        raise InputError(f"candidates: the chosen candidate {chosen.id}'s model {chosen.model.uri} is not an .mnn file")
    shutil.copyfile(local, ctx.outdir / "model.mnn")
    payload = metrics_json(judged, selection)
    (ctx.outdir / "metrics.json").write_text(json.dumps(payload, indent=2))
    (ctx.outdir / "report.html").write_text(render_html(judged, selection, title=spec.title))
    (ctx.outdir / "report.md").write_text(render_markdown(judged, selection))
    # The chosen candidate's own measurements under their own names (e.g. candidate/top1, and its
    # model step's fp32_accuracy), so the release gate judges it exactly as in a single run.
    metrics = {**chosen.reference_metrics, **chosen.metrics, **payload["metrics"]}
    return Result(
        chosen=chosen.id,
        reason=selection.reason,
        front=selection.front,
        feasible=selection.feasible,
        chosen_overrides=chosen.overrides,
        chosen_recipe_digest=chosen.recipe_digest,
        source=chosen.model.uri,
        candidates=judged,
        metrics=metrics,
    )


register(name="select", spec=Spec, result=Result, run=run, stage="select", model_input="candidates", hands_on=HandOff("model.mnn", "mnn"))
