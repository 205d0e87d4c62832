"""What a search publishes for people and dashboards: report.html, a Markdown summary, metrics.json.

The plot and the tables come from mnnpipe.report (the benchmark step's helpers), so a search
report looks like a benchmark report: median latency over size, one marker per candidate, with
its accuracy written beside it; the marker says whether it meets the constraints and whether it is
on the Pareto front, and a ring marks the chosen one.
"""

from __future__ import annotations

from typing import Any

from ..report import html_report, latency_size_plot, markdown_table
from .select import CandidateMetrics, Selection, drop_pp
from .spec import describe_overrides

__all__ = ["LEGEND_NOTE", "SERIES", "STYLES", "metrics_json", "plot_points", "render_html", "render_markdown"]

#: Plot series, in legend order, each with its own marker: colour and shape say whether the
#: candidate meets the constraints (blue circle) or not (red square); a filled marker is on the
#: Pareto front of size, latency and accuracy, a hollow one is off it. The chosen candidate is
#: also ringed. Fixed per name, so a series looks the same in every report whatever else is drawn.
SERIES = ("feasible, on front", "feasible, off front", "infeasible, on front", "infeasible, off front")
STYLES = {
    "feasible, on front": {"marker": "o", "color": "#1f77b4", "filled": True},
    "feasible, off front": {"marker": "o", "color": "#1f77b4", "filled": False},
    "infeasible, on front": {"marker": "s", "color": "#d62728", "filled": True},
    "infeasible, off front": {"marker": "s", "color": "#d62728", "filled": False},
}
#: What the plot's markers mean, for the page under it.
LEGEND_NOTE = (
    "Markers: blue circles meet the constraints, red squares do not; filled is on the Pareto front of size, "
    "median latency and accuracy (over every candidate that ran), hollow is off it; the ring is the chosen candidate."
)


def _series(c: CandidateMetrics, selection: Selection) -> str:
    feasible = "feasible" if c.id in selection.feasible else "infeasible"
    return f"{feasible}, {'on' if c.id in selection.front else 'off'} front"


def _note(c: CandidateMetrics) -> str:
    parts = [f"top-1 {c.accuracy * 100:.1f}%"] if c.accuracy is not None else []
    drop = drop_pp(c)
    if drop is not None:
        parts.append(f"{0.0 - drop:+.1f} pp")  # 0.0 - : no "-0.0" for no drop
    return " ".join(parts)


def plot_points(cands: list[CandidateMetrics], selection: Selection) -> list[dict[str, Any]]:
    """The points latency_size_plot draws: candidates with a size and a median latency, grouped in
    SERIES order so the legend always reads in the same order."""
    points = [
        {
            "label": c.id,
            "size_bytes": c.size_bytes,
            "latency_ms": c.latency_ms_p50,
            "series": _series(c, selection),
            "note": _note(c),
        }
        for c in cands
        if c.size_bytes is not None and c.latency_ms_p50 is not None
    ]
    return sorted(points, key=lambda p: SERIES.index(p["series"]))


def _rows(cands: list[CandidateMetrics], selection: Selection) -> list[dict[str, Any]]:
    rows = []
    for c in cands:
        missed = selection.violations.get(c.id, [])
        drop = drop_pp(c)
        rows.append(
            {
                "id": c.id + (" (chosen)" if c.id == selection.chosen else ""),
                "overrides": describe_overrides(c.overrides),
                "size B": c.size_bytes,
                "p50 ms": c.latency_ms_p50,
                "p90 ms": c.latency_ms_p90,
                "top-1 %": None if c.accuracy is None else round(c.accuracy * 100, 2),
                "drop pp": None if drop is None else round(drop, 2),
                "fidelity": c.fidelity,
                "feasible": "yes" if c.id in selection.feasible else "; ".join(missed) or "no",
                "on front": c.id in selection.front,
            }
        )
    return rows


def render_html(cands: list[CandidateMetrics], selection: Selection, *, title: str) -> str:
    """One self-contained page: the plot (base64 PNG), the choice and its reason, every candidate."""
    points = plot_points(cands, selection)
    png = (
        latency_size_plot(points, title=f"{title}: median latency vs size", styles=STYLES, highlight=selection.chosen, highlight_label="chosen")
        if points
        else None
    )
    notes = [LEGEND_NOTE] if points else []
    unplotted = [c.id for c in cands if c.size_bytes is None or c.latency_ms_p50 is None]
    if unplotted:
        notes.append(f"Not plotted (no size or latency measured): {', '.join(unplotted)}.")
    choice = [{"chosen": selection.chosen or "none", "reason": selection.reason}]
    tables: list[tuple[str, list[dict[str, Any]]]] = [("Choice", choice), ("Candidates", _rows(cands, selection))]
    if selection.closest:
        tables.append(("Closest to feasible", [{"id": c.id, "violations": "; ".join(c.violations), "excess": c.excess} for c in selection.closest]))
    return html_report(title, tables, png=png, notes=notes)


def render_markdown(cands: list[CandidateMetrics], selection: Selection) -> str:
    """A short summary for the terminal or a README: the choice, its reason, one row per candidate."""
    columns = ["id", "overrides", "size B", "p50 ms", "top-1 %", "drop pp", "feasible", "on front"]
    head = f"**Chosen:** {selection.chosen or 'none'}: {selection.reason}\n\n"
    return head + markdown_table(_rows(cands, selection), columns)


_FLAT = {"size_bytes": "size_bytes", "latency_ms_p50": "p50_ms", "latency_ms_p90": "p90_ms", "accuracy": "accuracy", "fidelity": "fidelity"}


def _flat(c: CandidateMetrics, prefix: str) -> dict[str, float]:
    out = {f"{prefix}/{name}": float(getattr(c, field)) for field, name in _FLAT.items() if getattr(c, field) is not None}
    drop = drop_pp(c)
    if drop is not None:
        out[f"{prefix}/drop_pp"] = drop
    return out


def metrics_json(cands: list[CandidateMetrics], selection: Selection) -> dict[str, Any]:
    """What a search publishes as metrics.json: every record, the outcome, and flat numbers
    ("<id>/size_bytes", "chosen/p50_ms", ...) an orchestrator logs as metrics."""
    flat: dict[str, float] = {"candidates": float(len(cands)), "feasible": float(len(selection.feasible))}
    for c in cands:
        flat.update(_flat(c, c.id))
    chosen = next((c for c in cands if c.id == selection.chosen), None)
    if chosen is not None:
        flat.update(_flat(chosen, "chosen"))
    records = [
        {
            **c.model_dump(mode="json"),
            "feasible": c.id in selection.feasible,
            "violations": selection.violations.get(c.id, []),
            "on_front": c.id in selection.front,
        }
        for c in cands
    ]
    return {
        "candidates": records,
        "front": selection.front,
        "feasible": selection.feasible,
        "chosen": selection.chosen,
        "reason": selection.reason,
        "closest": [c.model_dump(mode="json") for c in selection.closest],
        "metrics": flat,
    }
