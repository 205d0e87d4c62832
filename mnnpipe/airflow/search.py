"""The recipe search on Airflow: the candidates fan out with dynamic task mapping, each a normal
chain of mnnpipe step tasks, and fan in to the `select` step, whose chosen model the release gate
releases; the trend step follows.

    candidates[0..n-1]                      (a mapped task group, expanded over the candidates)
      candidate -> distill -> prune -> convert -> quantize -> benchmark
    select        (trigger_rule all_done: every candidate is judged, failed ones included)
    release       (the gate on the chosen model; emits config.RELEASED_ASSET)
    trend         (every release of the model so far)

Candidates are computed when the DAG file is parsed (mnnpipe.search.spec: a grid or a seeded
sample; the same ids, in the same order, as `mnnpipe search` and the KFP pipeline) and every
candidate's every step spec is validated then. Each candidate is one map index of a mapped task
group (`task_group.expand_kwargs`): its tasks are the step operators of `render_recipe`, wired
through XCom from the same map index (`pipelines.pulled`), so candidate 2's quantize reads
candidate 2's converted model. What differs between the candidates' specs (e.g. prune.target.ratio)
is passed to the group as mapped arguments, placed in each step's spec where the value goes;
everything else, the wires included, is the same templated spec for every map index.

A space that switches a step on and off (quantize: [{...}, null]) gives candidates different
chains; each chain is its own mapped group (`candidates_1`, `candidates_2`, ...), and the select
step judges them all together. (A KFP ParallelFor runs one chain: see mnnpipe.kfp.search.)

A candidate whose step fails fails that map index only (its later steps are upstream_failed): the
`select` task runs once every candidate is done (trigger_rule all_done), records the failed ones
with the error their failing step pushed (XCom key `mnnpipe_error`) and chooses among the rest;
the DAG run succeeds when the release does. When no candidate meets the constraints, `select`
fails without retries naming the closest candidates (in its log and its XCom `mnnpipe_error`),
and nothing is released.

Candidates share prefixes through mnnpipe's content-addressed cache (one distilled student for
every prune ratio): with the step store shared, the first candidate of each prefix computes it and
the later ones are served (instances that run at the same time may each compute it). `select`
counts the steps served so and returns the count under "search" beside its Result.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

from . import config
from ..errors import SpecError
from ..recipe import Plan
from ..searching import SELECT_STEP, chains, search_candidates, search_digest
from .common import has_templates, spec_dict
from .pipelines import pulled, recipe_specs, step_operator, trend_task

#: The group of the candidates' tasks (with a suffix _1, _2... when the candidates run several chains).
GROUP = "candidates"
#: The XCom key under which a candidate's failing step leaves its error for the select task.
ERROR_KEY = "mnnpipe_error"
CANDIDATE_TASK = "candidate"


@dataclasses.dataclass
class SearchTasks:
    """What `render_search` added to the DAG."""

    digest: str
    #: group id -> the mapped task group of one chain of steps.
    groups: dict[str, Any]
    #: group id -> the candidate ids, by map index.
    candidates: dict[str, list[str]]
    select: Any
    release: Any
    trend: Any | None


@dataclasses.dataclass(frozen=True)
class _Varies:
    """Stands in, in a step's spec, for a value that differs between the candidates: the group's
    mapped argument `key` takes its place when the group is built."""

    key: str


def _merge(values: list[Any], where: str, varying: dict[str, list[Any]]) -> Any:
    """One spec from the candidates' specs of a step: what they share, and a _Varies where they differ."""
    first = values[0]
    if all(v == first for v in values[1:]):
        return first
    if all(isinstance(v, dict) for v in values) and all(v.keys() == first.keys() for v in values):
        return {k: _merge([v[k] for v in values], f"{where}.{k}", varying) for k in first}
    if all(isinstance(v, list) for v in values) and all(len(v) == len(first) for v in values):
        return [_merge([v[i] for v in values], f"{where}.{i}", varying) for i in range(len(first))]
    if has_templates(values):
        # A mapped argument is passed as it is, never rendered: a template inside it would stay one.
        raise SpecError(f"space: {where} differs between the candidates and holds a template (a wired model or a template=): search the values inside it instead")
    key = f"v{len(varying)}"
    varying[key] = values
    return _Varies(key)


def _place(spec: Any, arguments: Mapping[str, Any]) -> Any:
    if isinstance(spec, _Varies):
        return arguments[spec.key]
    if isinstance(spec, dict):
        return {k: _place(v, arguments) for k, v in spec.items()}
    if isinstance(spec, list):
        return [_place(v, arguments) for v in spec]
    return spec


def record_failure(context: Mapping[str, Any]) -> None:
    """on_failure_callback of the candidates' step tasks and of `select`: the error (one line) in
    XCom `mnnpipe_error`, for the select task to record (and for whoever is alerted)."""
    error = context.get("exception")
    text = " ".join(str(error).split())[:500] if error is not None else ""
    context["ti"].xcom_push(key=ERROR_KEY, value=text or (type(error).__name__ if error is not None else "failed"))


def _chain_group(
    group_id: str,
    members: list[tuple[Any, Plan]],
    *,
    model_uri: str,
    output: str,
    templates: Mapping[str, Any] | None,
    datasets: dict[str, str] | None,
) -> Any:
    """One mapped task group running `members` (candidates with one chain of steps), one map index each."""
    from airflow.sdk import get_current_context, task, task_group

    candidate_id = "{{ %s['id'] }}" % pulled(f"{group_id}.{CANDIDATE_TASK}")
    out = f"{output}/candidates/{candidate_id}"
    runs = {planned.step for planned in members[0][1].steps}
    templates = {k: v for k, v in (templates or {}).items() if k.partition(".")[0] in runs}
    per_candidate = [recipe_specs(p, model_uri=model_uri, output=out, group=group_id, templates=templates, datasets=datasets) for _, p in members]
    for (c, _), specs in zip(members, per_candidate):
        for step, spec in specs.items():
            try:
                spec_dict(step, spec)  # every candidate's every spec, at parse time
            except SpecError as e:
                raise SpecError(f"candidate {c.id} ({', '.join(f'{k}={v}' for k, v in c.overrides.items())}): {e}") from None
    steps = list(per_candidate[0])
    varying: dict[str, list[Any]] = {}
    merged = {step: _merge([specs[step] for specs in per_candidate], step, varying) for step in steps}
    label = {"map_index_template": candidate_id}  # the UI names each map index by its candidate

    def chain(candidate: dict[str, Any], **arguments: Any) -> None:
        @task(task_id=CANDIDATE_TASK, map_index_template="{{ candidate_id }}")
        def this_candidate(candidate: dict[str, Any]) -> dict[str, Any]:
            """This map index's candidate (its id names its outputs; the select task records it)."""
            get_current_context()["candidate_id"] = candidate["id"]  # type: ignore[typeddict-unknown-key]
            return candidate

        first = this_candidate(candidate)
        operators = []
        for step in steps:
            # Built with the first candidate's spec (validated), then given the spec with this
            # map index's values in place.
            op = step_operator(step, spec=per_candidate[0][step], on_failure_callback=record_failure, **label)
            op.spec = _place(merged[step], arguments)
            operators.append(op)
        for upstream, downstream in zip([first, *operators], operators):
            upstream >> downstream

    chain.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in ("candidate", *varying)]
    )
    chain.__doc__ = f"Candidates {', '.join(c.id for c, _ in members)}: {' -> '.join(steps)}, one map index each."
    items = [
        {"candidate": {"id": c.id, "overrides": c.overrides, "recipe_digest": p.digest}, **{k: values[i] for k, values in varying.items()}}
        for i, (c, p) in enumerate(members)
    ]
    return task_group(group_id=group_id)(chain).expand_kwargs(items)


def render_search(
    search: Any,
    *,
    model_uri: str,
    output: str,
    release_root: str,
    name: str,
    version: str,
    templates: Mapping[str, Any] | None = None,
    datasets: dict[str, str] | None = None,
    group: str = GROUP,
    move_latest: bool = True,
    trend: bool = True,
) -> SearchTasks:
    """The search's tasks in the current DAG (validated first: SpecError names the field).

    - `model_uri`: the source model (a template is fine, e.g. a version pulled from XCom);
    - candidates publish to `{output}/candidates/{candidate id}/{step}`, the selection to
      `{output}/select` (a template is fine);
    - the chosen model is released to `{release_root}/{name}/{version}/{search digest}/`,
      `{release_root}/{name}/latest.json` moves forward and config.RELEASED_ASSET is emitted; then
      the trend of `name`'s releases is published to `{release_root}/{name}/trend` (`trend=False`: none);
    - `templates`, `datasets`: as for `render_recipe`, written over every candidate's specs.

    Set the upstream of the search with `upstream >> list(tasks.groups.values())`.
    """
    from airflow.sdk import task
    from airflow.task.trigger_rule import TriggerRule

    parsed, cands = search_candidates(search)
    digest = search_digest(parsed)
    grouped = chains(cands)
    for dotted in templates or {}:
        if not any(planned.step == dotted.partition(".")[0] for members in grouped for planned in members[0][1].steps):
            raise SpecError(f"template '{dotted}': expected <step>.<field> with <step> a step some candidate runs")
    group_ids = [group] if len(grouped) == 1 else [f"{group}_{i}" for i in range(1, len(grouped) + 1)]
    groups = {
        gid: _chain_group(gid, members, model_uri=model_uri, output=output, templates=templates, datasets=datasets)
        for gid, members in zip(group_ids, grouped)
    }
    layout = {gid: [c.id for c, _ in members] for gid, members in zip(group_ids, grouped)}

    @task(task_id=SELECT_STEP, trigger_rule=TriggerRule.ALL_DONE, on_failure_callback=record_failure)
    def select(search: dict[str, Any], layout: dict[str, list[str]], output: str) -> dict[str, Any]:
        """Judge every candidate (failed ones too) and choose within the constraints: the select step."""
        from airflow.sdk import get_current_context

        return select_candidates(search, layout, output=output, ti=get_current_context()["ti"])

    chosen = select(search=parsed.model_dump(mode="json"), layout=layout, output=f"{output}/{SELECT_STEP}")
    for g in groups.values():
        g >> chosen

    releases = {c.id: dataclasses.asdict(p.release) for members in grouped for c, p in members}

    @task(task_id="release", outlets=[config.RELEASED_ASSET])
    def release(selected: dict[str, Any], releases: dict[str, dict[str, Any]], found: dict[str, str], release_root: str, digest: str, move_latest: bool) -> dict[str, Any]:
        """The release gate on the chosen candidate's model, judged by its own measurements."""
        from .pipelines import release_and_announce

        # The chosen candidate's planned release, fed from the select step: its hand-off is the
        # chosen model, its metrics the chosen candidate's own (as KFP's search pipeline does).
        planned = {**releases[selected["chosen"]], "candidate_from": SELECT_STEP, "metrics_from": SELECT_STEP, "reference_from": None}
        return release_and_announce(planned, found=found, results={SELECT_STEP: selected}, release_root=release_root, digest=digest, move_latest=move_latest)

    released = release(selected=chosen, releases=releases, found={"name": name, "version": version}, release_root=release_root, digest=digest, move_latest=move_latest)
    trended = None
    if trend:
        trended = trend_task(release_root=release_root, name=name)
        released >> trended
    return SearchTasks(digest=digest, groups=groups, candidates=layout, select=chosen, release=released, trend=trended)


def select_candidates(search: Any, layout: Mapping[str, list[str]], *, output: str, ti: Any) -> dict[str, Any]:
    """Inside the select task: every candidate's record from its steps' XCom (each group's map
    index i is its i-th candidate), the select step on them, and the search's count of steps and
    cache hits. Returns the select Result as a dict, with "search": {"digest", "candidates",
    "failed", "steps", "cache_hits"} beside it. No candidate within the constraints (or none that
    ran): AirflowFailException naming the closest, nothing handed on."""
    import logging

    from airflow.sdk.exceptions import AirflowFailException

    from ..errors import InputError, StepFailed
    from ..runner import run_step
    from ..searching import measured_results, select_spec

    log = logging.getLogger("mnnpipe")
    parsed, cands = search_candidates(search)
    digest = search_digest(parsed)
    plans = {c.id: p for members in chains(cands) for c, p in members}
    by_id = {c.id: c for c in cands}
    records, failed, steps_run, cache_hits = [], [], 0, 0
    for gid, ids in layout.items():
        for index, cid in enumerate(ids):
            results: dict[str, dict[str, Any]] = {}
            error = None
            for planned in plans[cid].steps:
                result = ti.xcom_pull(task_ids=f"{gid}.{planned.step}", map_indexes=index)
                if result is None:
                    pushed = ti.xcom_pull(task_ids=f"{gid}.{planned.step}", map_indexes=index, key=ERROR_KEY)
                    error = (pushed if pushed.startswith(f"{planned.step}:") else f"{planned.step}: {pushed}") if pushed else f"{planned.step} left no result"
                    break
                results[planned.step] = result
                steps_run += 1
                cache_hits += bool(result.get("cached"))
            if error is not None:
                failed.append(cid)
                log.warning("candidate %s (%s[%d]) failed: %s", cid, gid, index, error)
            records.append(measured_results(by_id[cid], plans[cid], results, error))
    order = {c.id: n for n, c in enumerate(cands)}
    records.sort(key=lambda r: order[r["id"]])
    some_plan = next(iter(plans.values()))
    stats = {"digest": digest, "candidates": len(records), "failed": failed, "steps": steps_run, "cache_hits": cache_hits}
    log.info("search %s: %d candidates (%d failed), %d steps run, %d served from the cache", digest, len(records), len(failed), steps_run, cache_hits)
    try:
        selected = run_step(SELECT_STEP, select_spec(parsed, digest, some_plan, records, output=output, ids_in_uris=True), quiet=True)
    except (SpecError, InputError, StepFailed) as e:  # the same candidates give the same verdict on a retry
        raise AirflowFailException(str(e)) from e
    log.info("select chose %s: %s", selected.chosen, selected.reason)
    return {**selected.model_dump(mode="json"), "search": stats}
