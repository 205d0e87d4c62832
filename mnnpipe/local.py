"""Run a recipe here, one step after another, through the same runner as every orchestrator.

The local rendering of `mnnpipe.recipe.plan`: each wire gets the URI of the model it names (the
source, or what an earlier step handed on), each step publishes under `<output>/<step>`, and the
release step publishes `<release_root>/<name>/<version>/<recipe digest>/`. The demo and `mnnpipe
search` use it; steps an identical earlier run computed are served from the cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from . import catalog
from .recipe import SOURCE, Plan, handoff_uri, plan, release_spec, wired_spec
from .release import TREND_STEP, release_prefix, trend_prefix
from .runner import run_step
from .specs import StepResult
from .store import join


@dataclass
class RecipeRun:
    plan: Plan
    results: dict[str, StepResult] = field(default_factory=dict)
    release: StepResult | None = None
    trend: StepResult | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def cache_hits(self) -> int:
        return sum(1 for r in self.results.values() if r.cached)

    @property
    def candidate_uri(self) -> str:
        return handoff_uri(self.results[self.plan.release.candidate_from], self.plan.release.candidate_from)


def run_recipe(
    recipe: Any,
    *,
    model_uri: str,
    output: str,
    release_root: str | None = None,
    name: str = "model",
    version: str = "1",
    datasets: dict[str, str] | None = None,
    use_cache: bool = True,
    quiet: bool = True,
    move_latest: bool = True,
    on_step: Callable[[str, StepResult, float], None] | None = None,
) -> RecipeRun:
    """Run every step of `recipe` on the model at `model_uri`; with `release_root`, then the
    release gate (StepFailed when the candidate is over budget: nothing is released)."""
    recipe_plan = plan(recipe)
    run = RecipeRun(recipe_plan)
    uris = {SOURCE: model_uri}
    for planned in recipe_plan.steps:
        started = time.perf_counter()
        spec = wired_spec(planned, uris, output=join(output, planned.step), datasets=datasets)
        result = run_step(planned.step, spec, use_cache=use_cache, quiet=quiet)
        run.results[planned.step] = result
        run.seconds[planned.step] = time.perf_counter() - started
        if catalog.get(planned.step).hands_on is not None:
            uris[planned.step] = handoff_uri(result, planned.step)
        if on_step is not None:
            on_step(planned.step, result, run.seconds[planned.step])
    if release_root is not None:
        release = recipe_plan.release
        started = time.perf_counter()
        spec = release_spec(
            release,
            candidate_uri=run.candidate_uri,
            candidate_metrics=run.results[release.metrics_from].metrics,
            reference_metrics=run.results[release.reference_from].metrics if release.reference_from else None,
            output=release_prefix(release_root, name, version, recipe_plan.digest),
            move_latest=move_latest,
        )
        run.release = run_step(release.step, spec, use_cache=use_cache, quiet=quiet)
        run.seconds[release.step] = time.perf_counter() - started
        if on_step is not None:
            on_step(release.step, run.release, run.seconds[release.step])
        started = time.perf_counter()
        run.trend = run_trend(release_root, name, quiet=quiet)
        if on_step is not None:
            on_step(TREND_STEP, run.trend, time.perf_counter() - started)
    return run


def run_trend(release_root: str, name: str, *, quiet: bool = True) -> StepResult:
    """`<release_root>/<name>/trend/`: every release of `name` so far, regressions flagged."""
    spec = {"release_root": release_root, "name": name, "output": trend_prefix(release_root.rstrip("/"), name)}
    return run_step(TREND_STEP, spec, quiet=quiet)


