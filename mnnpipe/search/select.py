"""Choosing among measured candidates: constraints, the Pareto front, and the objective.

Pure functions over `CandidateMetrics` records, so the local runner, the KFP pipeline and the
Airflow DAG all choose the same candidate from the same measurements, and a person can replay the
choice from metrics.json alone.

Missing metrics: a constraint on a metric that was not measured is a violation ("accuracy not
measured"), and for the Pareto front and the objectives a missing metric counts as the worst
value, so an unmeasured candidate never wins on the strength of what nobody measured.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator

from ..errors import InputError
from ..specs import Strict
from .spec import Constraints, Objective

__all__ = ["CandidateMetrics", "Closest", "Selection", "drop_pp", "excess", "pareto_front", "select", "summary", "violations"]

_INF = math.inf
#: Allowance for float noise when a measured value sits exactly on its limit (as the gate step).
_EPS = 1e-9


class CandidateMetrics(Strict):
    """What one candidate's run measured. A non-finite number is recorded as None (not measured)."""

    id: str = Field(description="The candidate's id (c00, c01, ...).")
    overrides: dict[str, Any] = Field(default_factory=dict, description="The values the candidate set, by dotted recipe path.")
    recipe_digest: str = Field("", description="Digest of the candidate's complete recipe.")
    model_uri: str = Field("", description="Where the candidate's compressed model was published; empty when it failed.")
    size_bytes: int | None = Field(None, ge=0, description="Size of the compressed model file, in bytes.")
    latency_ms_p50: float | None = Field(None, ge=0, description="Median latency, in milliseconds.")
    latency_ms_p90: float | None = Field(None, ge=0, description="90th percentile latency, in milliseconds.")
    accuracy: float | None = Field(None, ge=0, le=1, description="Accuracy of the compressed model, 0-1.")
    reference_accuracy: float | None = Field(None, ge=0, le=1, description="Accuracy of the uncompressed source model, 0-1.")
    fidelity: float | None = Field(None, ge=-1, le=1, description="Cosine similarity of the candidate's outputs to the source model's.")
    status: Literal["ok", "failed"] = Field("ok", description="failed: the candidate's pipeline did not finish; see `error`.")
    error: str | None = Field(None, description="Why the candidate failed (one line).")

    @field_validator("latency_ms_p50", "latency_ms_p90", "accuracy", "reference_accuracy", "fidelity", mode="before")
    @classmethod
    def _finite(cls, v: Any) -> Any:
        return None if isinstance(v, float) and not math.isfinite(v) else v


class Closest(Strict):
    """An infeasible candidate and what it misses, for when no candidate is feasible."""

    id: str = Field(description="The candidate's id.")
    violations: list[str] = Field(description="The constraints it misses, in words.")
    excess: float | None = Field(
        description="Sum over its measured violations of how far each is beyond its limit, relative to the limit; "
        "None when it failed."
    )


class Selection(Strict):
    """The outcome of a search: the chosen candidate (if any) and why."""

    chosen: str | None = Field(description="Id of the chosen candidate; None when no candidate is feasible.")
    reason: str = Field(description="One sentence with the numbers behind the choice.")
    front: list[str] = Field(description="Ids on the Pareto front of size, median latency and accuracy (ok candidates).")
    feasible: list[str] = Field(description="Ids of the candidates that meet every constraint.")
    violations: dict[str, list[str]] = Field(
        default_factory=dict, description="Every candidate's missed constraints by id (empty: feasible), for reports."
    )
    closest: list[Closest] = Field(default_factory=list, description="When none is feasible: the 3 nearest to feasible, nearest first.")


def drop_pp(c: CandidateMetrics) -> float | None:
    """Reference accuracy - accuracy in percentage points (> 0: worse than the source model)."""
    if c.accuracy is None or c.reference_accuracy is None:
        return None
    return (c.reference_accuracy - c.accuracy) * 100.0


def violations(c: CandidateMetrics, constraints: Constraints) -> list[str]:
    """The constraints `c` misses, in words; empty means feasible. A failed candidate misses everything."""
    if c.status == "failed":
        return [f"failed: {c.error or 'no error recorded'}"]
    out: list[str] = []
    k = constraints
    if k.max_size_bytes is not None:
        if c.size_bytes is None:
            out.append("size not measured")
        elif c.size_bytes > k.max_size_bytes:
            out.append(f"size {c.size_bytes:,} B > max {k.max_size_bytes:,} B")
    if k.max_latency_ms_p50 is not None:
        if c.latency_ms_p50 is None:
            out.append("latency not measured")
        elif c.latency_ms_p50 > k.max_latency_ms_p50 + _EPS:
            out.append(f"p50 {c.latency_ms_p50:.3g} ms > max {k.max_latency_ms_p50:g} ms")
    if k.max_accuracy_drop is not None:
        drop = drop_pp(c)
        if c.accuracy is None:
            out.append("accuracy not measured")
        elif drop is None:
            out.append("reference accuracy not measured")
        elif drop > k.max_accuracy_drop + _EPS:
            out.append(f"accuracy drop {drop:.2f} pp > max {k.max_accuracy_drop:g} pp")
    if k.min_fidelity is not None:
        if c.fidelity is None:
            out.append("fidelity not measured")
        elif c.fidelity < k.min_fidelity - _EPS:
            out.append(f"fidelity {c.fidelity:.4f} < min {k.min_fidelity:g}")
    return out


def excess(c: CandidateMetrics, constraints: Constraints) -> tuple[int, int, float]:
    """How far `c` is from feasible, as a sort key: (failed, metrics not measured, summed relative excess).

    Each measured violation counts as its distance beyond the limit over the limit: size and
    latency relative to their maximum, the accuracy drop relative to its maximum (at least 0.1 pp,
    so a zero budget does not divide by zero), fidelity relative to the allowed distance from a
    perfect cosine, 1 - min_fidelity (at least 0.001). A metric nobody measured cannot be compared
    at all, so any count of them sorts after every measured miss."""
    if c.status == "failed":
        return 1, 0, 0.0
    k, missing, total = constraints, 0, 0.0
    checks = [
        (k.max_size_bytes, c.size_bytes, lambda v, lim: (v - lim) / lim),
        (k.max_latency_ms_p50, c.latency_ms_p50, lambda v, lim: (v - lim) / lim),
        (k.max_accuracy_drop, drop_pp(c), lambda v, lim: (v - lim) / max(lim, 0.1)),
        (k.min_fidelity, c.fidelity, lambda v, lim: (lim - v) / max(1.0 - lim, 1e-3)),
    ]
    for limit, value, beyond in checks:
        if limit is None:
            continue
        if value is None:
            missing += 1
        else:
            total += max(0.0, beyond(value, limit))
    return 0, missing, total


def _costs(c: CandidateMetrics) -> tuple[float, float, float]:
    """(size, p50, -accuracy): lower is better in each; a missing metric is the worst (infinite)."""
    size = float(c.size_bytes) if c.size_bytes is not None else _INF
    p50 = c.latency_ms_p50 if c.latency_ms_p50 is not None else _INF
    acc = -c.accuracy if c.accuracy is not None else _INF
    return size, p50, acc


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(cands: list[CandidateMetrics]) -> list[str]:
    """Ids of the ok candidates no other ok candidate dominates on (size, p50 latency, accuracy),
    in input order. Equal points do not dominate each other: all of them stay on the front."""
    ok = [(c.id, _costs(c)) for c in cands if c.status == "ok"]
    return [cid for cid, cost in ok if not any(_dominates(other, cost) for _, other in ok)]


def _normalized(values: list[float | None]) -> list[float]:
    """Min-max to 0 (best) .. 1 (worst) over the given values (lower is better); missing: 1."""
    present = [v for v in values if v is not None]
    lo, hi = (min(present), max(present)) if present else (0.0, 0.0)
    return [1.0 if v is None else (0.0 if hi == lo else (v - lo) / (hi - lo)) for v in values]


def _weighted_scores(cands: list[CandidateMetrics], objective: Objective) -> dict[str, float]:
    w = objective.weights
    assert w is not None  # Objective requires weights for kind 'weighted'
    sizes = _normalized([None if c.size_bytes is None else float(c.size_bytes) for c in cands])
    p50s = _normalized([c.latency_ms_p50 for c in cands])
    accs = _normalized([None if c.accuracy is None else -c.accuracy for c in cands])  # higher is better
    return {c.id: w.size * s + w.latency * t + w.accuracy * a for c, s, t, a in zip(cands, sizes, p50s, accs)}


def _ranking(cands: list[CandidateMetrics], objective: Objective) -> tuple[list[CandidateMetrics], dict[str, float]]:
    """`cands` best first under the objective; ties go to the other metrics, then the id."""
    kind = objective.kind
    if kind == "weighted":
        scores = _weighted_scores(cands, objective)
        return sorted(cands, key=lambda c: (round(scores[c.id], 12), _costs(c), c.id)), scores
    order = {"smallest": (0, 1, 2), "fastest": (1, 0, 2), "most-accurate": (2, 0, 1)}[kind]
    return sorted(cands, key=lambda c: (tuple(_costs(c)[i] for i in order), c.id)), {}


def summary(c: CandidateMetrics) -> str:
    """'c03 at 41,200 B (p50 0.21 ms, top-1 96.1%, -0.6 pp)': a candidate's numbers in one phrase."""
    size = f"{c.size_bytes:,} B" if c.size_bytes is not None else "size not measured"
    details = [f"p50 {c.latency_ms_p50:.3g} ms" if c.latency_ms_p50 is not None else "p50 not measured"]
    if c.accuracy is not None:
        details.append(f"top-1 {c.accuracy * 100:.1f}%")
    drop = drop_pp(c)
    if drop is not None:
        details.append(f"{-drop:+.1f} pp")
    if c.fidelity is not None:
        details.append(f"cosine {c.fidelity:.4f}")
    return f"{c.id} at {size} ({', '.join(details)})"


_LABELS = {"smallest": "smallest feasible", "fastest": "fastest feasible", "most-accurate": "most accurate feasible"}


def select(cands: list[CandidateMetrics], constraints: Constraints, objective: Objective) -> Selection:
    """The best feasible candidate under `objective`, the Pareto front, and, when nothing is
    feasible, the three candidates nearest to feasible (see `excess`)."""
    ids = [c.id for c in cands]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise InputError(f"candidates: duplicate ids {dup}")
    if not cands:
        return Selection(chosen=None, reason="no candidates were evaluated", front=[], feasible=[])
    front = pareto_front(cands)
    missed = {c.id: violations(c, constraints) for c in cands}
    feasible = [c for c in cands if not missed[c.id]]
    failed = sum(c.status == "failed" for c in cands)
    tally = f"{len(feasible)} of {len(cands)} candidates feasible" + (f" ({failed} failed)" if failed else "")
    if feasible:
        ranked, scores = _ranking(feasible, objective)
        best = ranked[0]
        if objective.kind == "weighted":
            w = objective.weights
            label = f"best weighted score {scores[best.id]:.3f} (size {w.size:g}, latency {w.latency:g}, accuracy {w.accuracy:g})"
        else:
            label = _LABELS[objective.kind]
        return Selection(
            chosen=best.id, reason=f"{label}: {summary(best)}; {tally}", front=front, feasible=[c.id for c in feasible], violations=missed
        )
    nearest = sorted(cands, key=lambda c: (excess(c, constraints), c.id))[:3]
    closest = [
        Closest(id=c.id, violations=missed[c.id], excess=None if c.status == "failed" else round(excess(c, constraints)[2], 6)) for c in nearest
    ]
    head = closest[0]
    return Selection(
        chosen=None,
        reason=f"no candidate meets the constraints: {tally}; closest: {head.id} ({'; '.join(head.violations)})",
        front=front,
        feasible=[],
        violations=missed,
        closest=closest,
    )
