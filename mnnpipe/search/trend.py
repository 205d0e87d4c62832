"""The trend of a model's releases over its versions: size, latency and accuracy, with regressions.

A search picks the best recipe for one model version; the trend shows whether each release is
worse than the one before it (a new version that compresses less well, or a recipe change that
costs accuracy), read back from the release manifests the gate step publishes under
`<release_root>/<name>/<version>/<recipe digest>/manifest.json`.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from ..errors import InputError
from ..registry import version_key
from ..report import html_report
from ..specs import Strict
from ..store import MANIFEST, join, store_for

__all__ = ["Release", "Trend", "TrendPoint", "TrendTolerance", "collect_releases", "render_trend_html", "trend", "trend_json", "trend_plot"]

log = logging.getLogger(__name__)

#: The benchmark's name for the released candidate's median latency at 1 thread, batch 1; the
#: gate records it among its candidate_metrics when the benchmark fed it.
_BENCH_P50 = "candidate/t1_b1/p50_ms"


def _parse_time(value: str) -> datetime:
    """An ISO 8601 time; one without a zone is taken as UTC (the runner writes UTC)."""
    t = datetime.fromisoformat(value)
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


Metric = Literal["size", "latency", "accuracy"]


class Release(Strict):
    """One published release of a model version (one recipe)."""

    version: str = Field(min_length=1, description="The model version released.")
    released_at: str = Field(description="When the release was published (ISO 8601).")
    recipe_digest: str = Field("", description="Digest of the recipe that produced it.")
    size_bytes: int = Field(ge=0, description="Size of the released model file, in bytes.")
    latency_ms_p50: float | None = Field(None, ge=0, description="Median latency, in milliseconds, when measured.")
    accuracy: float | None = Field(None, ge=0, le=1, description="Accuracy, 0-1, when measured.")

    @field_validator("released_at")
    @classmethod
    def _iso(cls, v: str) -> str:
        try:
            _parse_time(v)
        except ValueError:
            raise ValueError(f"not an ISO 8601 time: '{v}'") from None
        return v


class TrendTolerance(Strict):
    """How much worse than the previous release a release may be before it is flagged."""

    accuracy_pp: float = Field(0.5, ge=0, description="Largest allowed accuracy drop, in percentage points.")
    size_ratio: float = Field(1.05, ge=1, description="Largest allowed size / previous size (1.05 = +5%).")
    latency_ratio: float = Field(1.10, ge=1, description="Largest allowed p50 latency / previous p50 latency.")


class TrendPoint(Release):
    """A release in the series, and whether it regressed from the one before it."""

    regression: bool = Field(False, description="True when worse than the previous release beyond tolerance.")
    regressed: list[Metric] = Field(default_factory=list, description="The metrics that regressed.")
    reasons: list[str] = Field(default_factory=list, description="What regressed, in words.")


class Trend(Strict):
    """Releases oldest first (by released_at, then version)."""

    tolerance: TrendTolerance = Field(description="The tolerance the regressions were judged by.")
    points: list[TrendPoint] = Field(description="The series, oldest first.")


def _labels(releases: list[Release]) -> list[str]:
    """Versions, with the recipe digest's start where one version was released with several recipes."""
    counts = Counter(r.version for r in releases)
    return [f"{r.version} ({r.recipe_digest[:8]})" if counts[r.version] > 1 and r.recipe_digest else r.version for r in releases]


def _regressions(prev: Release, cur: Release, tol: TrendTolerance, prev_label: str) -> list[tuple[Metric, str]]:
    """What in `cur` is worse than in `prev` beyond tolerance; a metric missing on either side is not compared."""
    out: list[tuple[Metric, str]] = []
    eps = 1e-9
    if prev.accuracy is not None and cur.accuracy is not None:
        drop = (prev.accuracy - cur.accuracy) * 100
        if drop > tol.accuracy_pp + eps:
            out.append(("accuracy", f"accuracy {cur.accuracy * 100:.2f}% is {drop:.2f} pp below {prev_label} (tolerance {tol.accuracy_pp:g} pp)"))
    if prev.size_bytes > 0 and cur.size_bytes > prev.size_bytes * tol.size_ratio + eps:
        growth = cur.size_bytes / prev.size_bytes - 1
        out.append(("size", f"size {cur.size_bytes:,} B is {growth:+.1%} over {prev_label}'s {prev.size_bytes:,} B (tolerance {tol.size_ratio - 1:+.0%})"))
    if prev.latency_ms_p50 and cur.latency_ms_p50 is not None and cur.latency_ms_p50 > prev.latency_ms_p50 * tol.latency_ratio + eps:
        growth = cur.latency_ms_p50 / prev.latency_ms_p50 - 1
        out.append((
            "latency",
            f"p50 {cur.latency_ms_p50:.3g} ms is {growth:+.1%} over {prev_label}'s {prev.latency_ms_p50:.3g} ms "
            f"(tolerance {tol.latency_ratio - 1:+.0%})",
        ))
    return out


def trend(releases: list[Release], tolerance: TrendTolerance | None = None) -> Trend:
    """The series ordered by released_at then version, each release judged against the previous
    release of another version: a version released again (another recipe, a rerun) is a point of
    its own but not a regression of itself."""
    tol = tolerance or TrendTolerance()
    ordered = sorted(releases, key=lambda r: (_parse_time(r.released_at), version_key(r.version), r.recipe_digest))
    labels = _labels(ordered)
    points = []
    for i, r in enumerate(ordered):
        prev = next((j for j in range(i - 1, -1, -1) if ordered[j].version != r.version), None)
        found = _regressions(ordered[prev], r, tol, labels[prev]) if prev is not None else []
        points.append(
            TrendPoint(**r.model_dump(), regression=bool(found), regressed=[m for m, _ in found], reasons=[why for _, why in found])
        )
    return Trend(tolerance=tol, points=points)


def trend_json(t: Trend) -> dict[str, Any]:
    """The series as JSON: every point, and the versions that regressed."""
    return {
        "tolerance": t.tolerance.model_dump(mode="json"),
        "series": [p.model_dump(mode="json") for p in t.points],
        "regressions": [p.version for p in t.points if p.regression],
    }


def trend_plot(t: Trend, name: str) -> bytes:
    """PNG bytes: size, p50 latency and accuracy over the releases, regressions as red crosses.

    A bare Figure on the Agg canvas with fixed margins, as mnnpipe.report draws (no pyplot, no
    tight_layout: cheaper than the drawing itself)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.5, 3.4), dpi=90)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.28, top=0.84, wspace=0.3)
    fig.suptitle(f"{name}: releases over versions", fontsize=11)
    labels = _labels(t.points)
    panels: list[tuple[Metric, str, list[float | None]]] = [
        ("size", "size (KB)", [p.size_bytes / 1e3 for p in t.points]),
        ("latency", "median latency (ms)", [p.latency_ms_p50 for p in t.points]),
        ("accuracy", "top-1 (%)", [None if p.accuracy is None else p.accuracy * 100 for p in t.points]),
    ]
    for i, (metric, ylabel, values) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        xs = [x for x, v in enumerate(values) if v is not None]
        ax.plot(xs, [values[x] for x in xs], marker="o", color="tab:blue", label="release")
        bad = [x for x in xs if metric in t.points[x].regressed]
        if bad:
            ax.scatter(bad, [values[x] for x in bad], marker="X", s=90, color="tab:red", zorder=3, label="regression")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(ylabel, fontsize=10)
        ax.grid(True, alpha=0.3)
        if bad or i == 0:
            ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def render_trend_html(t: Trend, name: str) -> str:
    """One self-contained page: the three plots (base64 PNG), then one row per release."""
    rows = [
        {
            "version": p.version,
            "released at": p.released_at,
            "recipe": p.recipe_digest,
            "size B": p.size_bytes,
            "p50 ms": p.latency_ms_p50,
            "top-1 %": None if p.accuracy is None else round(p.accuracy * 100, 2),
            "regression": "; ".join(p.reasons) if p.regression else "no",
        }
        for p in t.points
    ]
    png = trend_plot(t, name) if t.points else None
    tol = t.tolerance
    note = f"Regression: worse than the previous release by more than {tol.accuracy_pp:g} pp accuracy, x{tol.size_ratio:g} size or x{tol.latency_ratio:g} latency."
    return html_report(f"{name}: release trend", [("Releases", rows)], png=png, notes=[note])


def _release(version: str, digest: str, manifest: dict[str, Any]) -> Release:
    """A Release from a gate manifest: the released file's size, the gate's measurements."""
    result = manifest["result"]
    metrics = result.get("metrics") or {}
    spec = manifest.get("spec") or {}
    artifacts = manifest["artifacts"]
    source_name = PurePosixPath(str(result.get("source", "")).split("?", 1)[0]).name
    if source_name in artifacts:
        size = artifacts[source_name]["size"]
    elif len(artifacts) == 1:
        size = next(iter(artifacts.values()))["size"]
    else:
        raise KeyError(f"cannot tell the released file among artifacts {sorted(artifacts)}")
    latency = metrics.get("latency_ms_p50", (spec.get("candidate_metrics") or {}).get(_BENCH_P50))
    accuracy = metrics.get("accuracy")
    value = result.get("value")
    if accuracy is None and spec.get("higher_is_better", True) and isinstance(value, (int, float)) and 0 <= value <= 1:
        accuracy = value  # the gate's metric: taken as an accuracy when higher is better and it is a fraction
    return Release(
        version=version, released_at=manifest["finished_at"], recipe_digest=digest, size_bytes=size, latency_ms_p50=latency, accuracy=accuracy
    )


def collect_releases(release_root: str, name: str) -> list[Release]:
    """Every release of model `name` under `release_root`, in listing order (pass them to `trend`).
    A folder without a readable, complete gate manifest is skipped with a warning."""
    base = join(release_root, name)
    store = store_for(base)
    found = []
    for uri in store.list(base):
        parts = uri[len(base) + 1 :].split("/")
        if len(parts) != 3 or parts[2] != MANIFEST:
            continue  # latest.json, the released files, result.json
        version, digest = parts[0], parts[1]
        try:
            manifest = json.loads(store.read_bytes(uri))
            found.append(_release(version, digest, manifest))
        except (InputError, ValueError, KeyError, TypeError, AttributeError, ValidationError) as e:
            # InputError: the manifest vanished after the listing. A StoreError (the store itself
            # failing) is raised: a trend silently missing releases would look like a real one.
            log.warning("%s: skipped, not a readable release manifest (%s)", uri, str(e).splitlines()[0] if str(e) else type(e).__name__)
    return found
