"""The release trend of one model: every released version's size, latency and accuracy over time.

Read back from the release manifests the gate publishes under `<release_root>/<name>/<version>/
<recipe digest>/`, so it needs no database: the store is the record. Publishes trend.json (the
series, and the versions that regressed) and trend.html (plots and a table). A release worse than
the previous one beyond `tolerance` is flagged; with `fail_on_regression` the step fails (exit 1)
after saying which, so a scheduler can alert on it.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from pydantic import Field, field_validator

from ..catalog import register
from ..errors import InputError, StepFailed
from ..search.trend import TrendTolerance, collect_releases, render_trend_html, trend, trend_json
from ..specs import StepResult, StepSpec, check_uri

log = logging.getLogger("mnnpipe")


class Spec(StepSpec):
    """Plot every release of a model over its versions and flag a release worse than the previous one."""

    kind: Literal["trend"] = "trend"
    release_root: str = Field(description="Where the gate releases: `<release_root>/<name>/<version>/<recipe digest>/`.")
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="The model's name under release_root.")
    tolerance: TrendTolerance = Field(default_factory=TrendTolerance, description="How much worse than the previous release a release may be.")
    fail_on_regression: bool = Field(False, description="True: a regression of the newest release fails the step (after publishing nothing).")

    @field_validator("release_root")
    @classmethod
    def _root(cls, v: str) -> str:
        return check_uri(v, "release_root")


class Result(StepResult):
    kind: Literal["trend"] = "trend"
    releases: int = Field(description="How many releases the series holds.")
    newest: str | None = Field(None, description="The newest release's version.")
    regression: bool = Field(False, description="True when the newest release is worse than the one before it beyond tolerance.")
    reasons: list[str] = Field(default_factory=list, description="What regressed in the newest release, in words.")
    regressed_versions: list[str] = Field(default_factory=list, description="Every version flagged in the series.")


def run(spec: Spec, ctx: Any) -> Result:
    releases = collect_releases(spec.release_root, spec.name)
    if not releases:
        raise InputError(f"release_root: no release of '{spec.name}' under {spec.release_root} (expected <name>/<version>/<digest>/manifest.json)")
    series = trend(releases, spec.tolerance)
    newest = series.points[-1]
    if newest.regression and spec.fail_on_regression:
        raise StepFailed(f"trend: release {newest.version} regressed: {'; '.join(newest.reasons)}")
    if newest.regression:
        log.warning("release %s of %s regressed: %s", newest.version, spec.name, "; ".join(newest.reasons))
    (ctx.outdir / "trend.json").write_text(json.dumps(trend_json(series), indent=2))
    (ctx.outdir / "trend.html").write_text(render_trend_html(series, spec.name))
    metrics: dict[str, float] = {"releases": float(len(series.points)), "regression": float(newest.regression), "newest/size_bytes": float(newest.size_bytes)}
    if newest.latency_ms_p50 is not None:
        metrics["newest/latency_ms_p50"] = newest.latency_ms_p50
    if newest.accuracy is not None:
        metrics["newest/accuracy"] = newest.accuracy
    return Result(
        releases=len(series.points),
        newest=newest.version,
        regression=newest.regression,
        reasons=newest.reasons,
        regressed_versions=[p.version for p in series.points if p.regression],
        metrics=metrics,
    )


# What the store holds changes between runs at the same spec: never served from the cache.
register(name="trend", spec=Spec, result=Result, run=run, stage="report", model_input=None, cacheable=False)
