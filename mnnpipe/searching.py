"""Recipe search, run here: every candidate recipe one after another (or in a small process pool),
then the `select` step over their measurements, then the release gate on the chosen one.

The same candidates (mnnpipe.search.spec), the same select and gate steps as on KFP (ParallelFor)
and Airflow (.expand): only the fan-out differs. Candidates share prefixes through the
content-addressed cache: one distilled student feeds every prune ratio, one fp32 .mnn every
quantize setting; `SearchRun.cache_hits` counts the steps served that way.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from collections.abc import Mapping
from typing import Any, Callable

from .errors import SpecError, StepFailed, ToolError
from .local import RecipeRun, run_recipe, run_trend
from .recipe import Plan, handoff_uri, plan, release_spec
from .release import release_prefix
from .runner import run_step
from .search.spec import Candidate, SearchSpec, candidates, parse_search
from .specs import StepResult
from .store import join

SELECT_STEP = "select"


@dataclass
class SearchRun:
    spec: SearchSpec
    digest: str
    candidates: list[Candidate]
    runs: dict[str, RecipeRun] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    selected: StepResult | None = None
    release: StepResult | None = None
    trend: StepResult | None = None

    @property
    def steps_run(self) -> int:
        return sum(len(r.results) for r in self.runs.values())

    @property
    def cache_hits(self) -> int:
        return sum(r.cache_hits for r in self.runs.values())


def search_digest(spec: SearchSpec) -> str:
    """16 hex digits naming a search (its whole spec): the release of its winner is keyed on it."""
    body = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def search_candidates(spec: Any) -> tuple[SearchSpec, list[Candidate]]:
    """The validated search and its candidates, each a complete, valid recipe (else SpecError, exit 2)."""
    from .recipe import parse_recipe

    parsed = parse_search(spec)
    return parsed, candidates(parsed, validate=parse_recipe)


def metric_names(recipe_plan: Plan) -> dict[str, str]:
    """The select step's metric names for a recipe: the benchmark's first threads/batch setting."""
    measuring = recipe_plan.step(recipe_plan.release.metrics_from).spec
    setting = f"t{(measuring.get('threads') or [1])[0]}_b{(measuring.get('batch_sizes') or [1])[0]}"
    return {"latency_p50": f"candidate/{setting}/p50_ms", "latency_p90": f"candidate/{setting}/p90_ms"}


def chain_of(recipe_plan: Plan) -> tuple[Any, ...]:
    """What a candidate runs, as an orchestrator's fan-out sees it: its steps in order, each with
    its wires and dataset fields. Candidates with the same chain differ only in their specs' values."""
    return tuple((s.step, s.wires, s.datasets) for s in recipe_plan.steps)


def chains(cands: list[Candidate]) -> list[list[tuple[Candidate, Plan]]]:
    """The candidates with their plans, grouped by the chain of steps they run (`chain_of`): the
    groups in order of their first candidate, each in candidate order. A space that switches a
    step on and off (e.g. quantize: [..., null]) gives one group per variant."""
    grouped: dict[tuple[Any, ...], list[tuple[Candidate, Plan]]] = {}
    for c in cands:
        p = plan(c.recipe)
        grouped.setdefault(chain_of(p), []).append((c, p))
    return list(grouped.values())


def one_chain(cands: list[Candidate], *, why: str) -> list[Plan]:
    """Each candidate's plan, when every candidate runs the same chain of steps; else SpecError
    naming `space` and the first candidate that differs, then `why` (e.g. what the orchestrator's
    loop can run)."""
    grouped = chains(cands)
    if len(grouped) > 1:
        (_, first), (c, other) = grouped[0][0], grouped[1][0]
        steps = [" -> ".join(s.step for s in p.steps) for p in (other, first)]
        runs = f"runs {steps[0]}, not {steps[1]}" if steps[0] != steps[1] else f"wires its models otherwise than {grouped[0][0][0].id} (compare)"
        raise SpecError(f"space: candidate {c.id} {runs}: {why}")
    by_id = {c.id: p for c, p in grouped[0]}
    return [by_id[c.id] for c in cands]


def measured_results(candidate: Candidate, recipe_plan: Plan, results: Mapping[str, Mapping[str, Any]] | None, error: str | None = None) -> dict[str, Any]:
    """The select step's record of one candidate, from its steps' Results as dicts (as an
    orchestrator holds them: XCom, KFP artifacts), by step name. With `error`, or without a Result
    of a step the release judges by, the candidate failed (the select step records it so)."""
    release = recipe_plan.release
    judged = [release.candidate_from, release.metrics_from, *([release.reference_from] if release.reference_from else [])]
    missing = [s for s in dict.fromkeys(judged) if results is None or s not in results]
    if error is not None or missing:
        return {"id": candidate.id, "overrides": candidate.overrides, "recipe_digest": recipe_plan.digest, "error": error or f"{missing[0]} left no result"}
    assert results is not None
    return {
        "id": candidate.id,
        "overrides": candidate.overrides,
        "recipe_digest": recipe_plan.digest,
        "model": {"uri": handoff_uri(results[release.candidate_from], release.candidate_from)},
        "metrics": dict(results[release.metrics_from]["metrics"]),
        "reference_metrics": dict(results[release.reference_from]["metrics"]) if release.reference_from else {},
    }


def measured_candidate(candidate: Candidate, run: RecipeRun | None, error: str | None) -> dict[str, Any]:
    """The select step's record of one candidate's run."""
    if run is None:
        return {"id": candidate.id, "overrides": candidate.overrides, "error": error or "did not run"}
    return measured_results(candidate, run.plan, {step: r.model_dump(mode="json") for step, r in run.results.items()})


def select_spec(parsed: SearchSpec, digest: str, recipe_plan: Plan, records: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """The select step's spec: the candidates' records (`measured_results`), the search's
    constraints and objective, the metric names of `recipe_plan` (any candidate's: they measure
    alike), and `extra` fields (output, ids_in_uris...)."""
    return {
        "candidates": records,
        "constraints": parsed.constraints.model_dump(mode="json"),
        "objective": parsed.objective.model_dump(mode="json", exclude_none=True),
        "metric_names": metric_names(recipe_plan),
        "title": f"recipe search {digest} ({len(records)} candidates)",
        **extra,
    }


def _run_candidate(candidate: Candidate, model_uri: str, output: str, use_cache: bool) -> tuple[RecipeRun | None, str | None]:
    """One candidate's recipe; a step that fails on its own budget or tool fails this candidate only."""
    try:
        return run_recipe(candidate.recipe, model_uri=model_uri, output=join(output, "candidates", candidate.id), use_cache=use_cache), None
    except (StepFailed, ToolError) as e:
        return None, " ".join(str(e).split())[:500]


def _waves(cands: list[Candidate]) -> list[list[Candidate]]:
    """For a pool: first one candidate per distinct first step, so that a shared prefix (one
    distilled student for every prune ratio) is computed once, then the rest from the cache."""
    first, rest, seen = [], [], set()
    for c in cands:
        key = json.dumps(plan(c.recipe).steps[0].spec, sort_keys=True)
        (rest if key in seen else first).append(c)
        seen.add(key)
    return [first, rest]


def run_search(
    spec: Any,
    *,
    model_uri: str,
    output: str,
    release_root: str | None = None,
    name: str = "model",
    version: str = "1",
    workers: int = 1,
    use_cache: bool = True,
    quiet: bool = True,
    on_candidate: Callable[[Candidate, RecipeRun | None, str | None], None] | None = None,
) -> SearchRun:
    """Run every candidate, select the best within the constraints (StepFailed naming the closest
    when none is), and with `release_root` release it: `<release_root>/<name>/<version>/<search digest>/`."""
    parsed, cands = search_candidates(spec)
    search = SearchRun(parsed, search_digest(parsed), cands)

    def record(c: Candidate, run: RecipeRun | None, error: str | None) -> None:
        if run is not None:
            search.runs[c.id] = run
        else:
            search.errors[c.id] = error or "failed"
        if on_candidate is not None:
            on_candidate(c, run, error)

    if workers <= 1:
        for c in cands:
            record(c, *_run_candidate(c, model_uri, output, use_cache))
    else:
        # spawn: a forked torch/MNN process is not safe to reuse; each worker imports afresh.
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            for wave in _waves(cands):
                futures = [(c, pool.submit(_run_candidate, c, model_uri, output, use_cache)) for c in wave]
                for c, future in futures:
                    record(c, *future.result())
    first_plan = next((r.plan for r in search.runs.values()), plan(cands[0].recipe))
    records = [measured_candidate(c, search.runs.get(c.id), search.errors.get(c.id)) for c in cands]
    spec_of_select = select_spec(parsed, search.digest, first_plan, records, output=join(output, SELECT_STEP))
    search.selected = run_step(SELECT_STEP, spec_of_select, use_cache=use_cache, quiet=quiet)
    if release_root is not None:
        chosen = search.runs[search.selected.chosen]
        search.release = run_step(
            chosen.plan.release.step,
            release_spec(
                chosen.plan.release,
                candidate_uri=search.selected.artifacts["model.mnn"].uri,
                candidate_metrics=search.selected.metrics,
                reference_metrics=None,
                output=release_prefix(release_root, name, version, search.digest),
                move_latest=True,
            ),
            use_cache=use_cache,
            quiet=quiet,
        )
        search.trend = run_trend(release_root, name, quiet=quiet)
    return search
