"""The Airflow rendering of a recipe (`mnnpipe.recipe.plan`): one task per planned step, wired
through XCom, and the release gate after them.

Each wire of a step's spec takes its model from the source model's URI (a template, e.g. a
version pulled from XCom) or from the Result an earlier step pushed to XCom
(`{{ ti.xcom_pull(task_ids=..., map_indexes=ti.map_index)['artifacts']['model.mnn']['uri'] }}`),
so the chain works the same whether the steps run in-process or in pods, in a mapped task group
or outside one. Step order, specs and hand-offs all come from the plan: a change of recipe
changes every DAG that renders it (see `mnnpipe.local` and `mnnpipe.kfp.pipeline`, the other
renderings).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from . import config
from .. import catalog
from ..errors import SpecError
from ..recipe import SOURCE, Plan, handoff_artifact, plan, wired_spec
from ..release import TREND_STEP, trend_prefix
from .operators import KUBERNETES_EXTRA_MISSING, kubernetes_provider_installed, operator_class


def pulled(task_id: str, *, same_index: bool = True) -> str:
    """A Jinja expression for what task `task_id` pushed to XCom in this run. Pulled from the same
    map index as the task rendering it, so it works inside a mapped task group (one instance per
    model version) and outside one alike (both -1 there). `same_index=False`: from a task that is
    not mapped, e.g. the one before a mapped group, pulled from inside the group."""
    if not same_index:
        return "ti.xcom_pull(task_ids='%s')" % task_id
    return "ti.xcom_pull(task_ids='%s', map_indexes=ti.map_index)" % task_id


def artifact_uri(task_id: str, artifact: str) -> str:
    """A Jinja expression for the URI of `artifact` (a path relative to the step's output, e.g.
    'model.mnn') in the Result that task `task_id` pushed to XCom."""
    return "{{ %s['artifacts']['%s']['uri'] }}" % (pulled(task_id), artifact)


def step_operator(step: str, *, task_id: str | None = None, spec: dict[str, Any], **kwargs: Any) -> Any:
    """The step's task in the DAGs' execution mode: in-process, or its own deferrable pod
    (`mnnpipe.airflow.pod`) with the Kubernetes options from the environment."""
    execution = config.execution()
    if execution == "kubernetes":
        if not kubernetes_provider_installed():
            raise SpecError(KUBERNETES_EXTRA_MISSING)
        from .pod import pod_operator_class

        return pod_operator_class(step)(task_id=task_id or step, spec=spec, **{**config.kubernetes_options(), **kwargs})
    return operator_class(step)(task_id=task_id or step, spec=spec, execution=execution, **kwargs)


def _set_path(spec: dict[str, Any], step: str, path: list[str], value: Any) -> None:
    """Write `value` at `path` (keys; list indices as digits) in `spec`, creating missing mappings."""
    node: Any = spec
    for i, part in enumerate(path):
        key: Any = int(part) if isinstance(node, list) and part.isdigit() else part
        last = i == len(path) - 1
        if isinstance(node, list):
            if not isinstance(key, int) or not -len(node) <= key < len(node):
                raise SpecError(f"template {step}.{'.'.join(path)}: no item {part} in {step}.{'.'.join(path[:i])}")
        elif not isinstance(node, dict):
            raise SpecError(f"template {step}.{'.'.join(path)}: {step}.{'.'.join(path[:i])} is not a mapping")
        if last:
            node[key] = value
        else:
            if isinstance(node, dict) and node.get(key) is None:
                node[key] = {}
            node = node[key]


def apply_templates(specs: Mapping[str, dict[str, Any]], templates: Mapping[str, Any] | None) -> None:
    """Write each `templates` value ("<step>.<field>[.<field>...]" -> a Jinja string, usually
    `{{ params.x }}`) over the spec of that step, in place; a path naming no planned step is a
    SpecError (a typo would otherwise be silently ignored)."""
    for dotted, value in (templates or {}).items():
        step, _, rest = dotted.partition(".")
        if step not in specs or not rest:
            raise SpecError(f"template '{dotted}': expected <step>.<field> with <step> one of {', '.join(specs)}")
        _set_path(specs[step], step, rest.split("."), value)


def recipe_specs(
    recipe_plan: Plan,
    *,
    model_uri: str,
    output: str,
    group: str = "",
    templates: Mapping[str, Any] | None = None,
    datasets: dict[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Each planned step's spec as `render_recipe` gives it to its operator (by step name, in order)."""
    prefix = f"{group}." if group else ""
    uris = {SOURCE: model_uri}
    specs: dict[str, dict[str, Any]] = {}
    for planned in recipe_plan.steps:
        specs[planned.step] = wired_spec(planned, uris, output=f"{output}/{planned.step}", datasets=datasets)
        if catalog.get(planned.step).hands_on is not None:
            uris[planned.step] = artifact_uri(prefix + planned.step, handoff_artifact(planned.step))
    apply_templates(specs, templates)
    return specs


def render_recipe(
    recipe: Any,
    *,
    model_uri: str,
    output: str,
    group: str = "",
    templates: dict[str, Any] | None = None,
    datasets: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One step task per planned step of `recipe`, chained with >> in the plan's order, in the
    current DAG (or task group). Returns the operators by step name (`release_task` gates and
    releases their result).

    - `model_uri`: the source model (a template is fine, e.g. a version pulled from XCom);
    - `output`: each step publishes under `{output}/{step}` (a template is fine);
    - `group`: inside a task group, its group_id (the prefix Airflow gives the task ids the
      specs pull their input models from);
    - `templates`: dotted spec paths -> Jinja strings written over the wired specs, e.g.
      {"distill.training.epochs": "{{ params.distill_epochs }}"} (the operators validate a
      templated value after rendering);
    - `datasets`: dataset field -> URI, bound where a step's spec has that dataset field.
    """
    recipe_plan = recipe if isinstance(recipe, Plan) else plan(recipe)
    specs = recipe_specs(recipe_plan, model_uri=model_uri, output=output, group=group, templates=templates, datasets=datasets)
    operators: dict[str, Any] = {step: step_operator(step, spec=spec) for step, spec in specs.items()}
    chain = list(operators.values())
    for upstream, downstream in zip(chain, chain[1:]):
        upstream >> downstream
    return operators


def release_task(recipe: Any, operators: Mapping[str, Any], *, found: Any, release_root: str, move_latest: bool = True) -> Any:
    """The release step after `render_recipe`'s tasks (the same gate as KFP's and the local
    runner's, `mnnpipe.recipe.release_spec`): the candidate is what the plan's `candidate_from`
    step handed on, judged by the `metrics_from` step's metrics against the `reference_from`
    step's. Within budget it publishes `{release_root}/{name}/{version}/{plan digest}/`, moves
    `{release_root}/{name}/latest.json` forward and emits `config.RELEASED_ASSET`; over budget the
    task fails without retries (a retry cannot change the verdict).

    `operators`: render_recipe's result; `found`: an XComArg of the version dict
    ({"version", "model_uri", "name"}); `release_root` may be a template.
    """
    from airflow.sdk import task

    recipe_plan = recipe if isinstance(recipe, Plan) else plan(recipe)
    release = recipe_plan.release
    needed = [release.candidate_from, release.metrics_from, *([release.reference_from] if release.reference_from else [])]
    results = {step: operators[step].output for step in dict.fromkeys(needed)}

    @task(task_id="release", outlets=[config.RELEASED_ASSET])
    def release_step(found: dict[str, str], results: dict[str, dict[str, Any]], release_root: str, planned: dict[str, Any], digest: str, move_latest: bool) -> dict[str, Any]:
        return release_and_announce(planned, found=found, results=results, release_root=release_root, digest=digest, move_latest=move_latest)

    # The planned release as plain data: it is a templated argument, shown rendered in the UI.
    planned = dataclasses.asdict(release)
    return release_step(found=found, results=results, release_root=release_root, planned=planned, digest=recipe_plan.digest, move_latest=move_latest)


def release_and_announce(planned: Mapping[str, Any], *, found: Mapping[str, str], results: Mapping[str, Mapping[str, Any]], release_root: str, digest: str, move_latest: bool) -> dict[str, Any]:
    """Inside a release task (its outlets: config.RELEASED_ASSET): the gate on the candidate
    (`release.gate_and_release`), then the RELEASED_ASSET event's extra. `planned`: a
    PlannedRelease as a dict. Over budget: AirflowFailException (a retry cannot change the verdict)."""
    from airflow.sdk import get_current_context
    from airflow.sdk.exceptions import AirflowFailException

    from ..errors import StepFailed
    from ..recipe import PlannedRelease
    from .release import gate_and_release

    try:
        result = gate_and_release(PlannedRelease(**planned), found=found, results=results, release_root=release_root, digest=digest, move_latest=move_latest)
    except (SpecError, StepFailed) as e:  # over budget stays over budget on every retry
        raise AirflowFailException(str(e)) from e
    # The gate publishes the candidate under its own file name (the hand-off's).
    released_file = PurePosixPath(handoff_artifact(planned["candidate_from"])).name
    context = get_current_context()
    context["outlet_events"][config.RELEASED_ASSET].extra = {
        "name": found.get("name", ""),
        "version": found["version"],
        "release": result["released"],
        "model_uri": result["artifacts"][released_file]["uri"],
        "latest_moved": result["latest_moved"],
    }
    return result


def model_name(version_task_id: str, *, same_index: bool = True) -> str:
    """A Jinja expression for the model name of the version dict ({"version", "model_uri",
    "name"}) task `version_task_id` pushed (the registry folder's name; 'model' when it has none),
    as the release names it."""
    return "{{ (%s or {}).get('name') or 'model' }}" % pulled(version_task_id, same_index=same_index)


def trend_task(*, release_root: str, name: str, task_id: str = TREND_STEP, **kwargs: Any) -> Any:
    """The trend step after a release: every release of `name` under `release_root` so far,
    regressions flagged, published to `{release_root}/{name}/trend` (trend.json, trend.html).
    Both may be templates. Never served from the cache (what the store holds changes)."""
    spec = {"release_root": release_root, "name": name, "output": trend_prefix(release_root, name)}
    return step_operator(TREND_STEP, task_id=task_id, spec=spec, **kwargs)


def latest_model_task(task_id: str = "latest_model") -> Any:
    """A task returning the newest version in the registry (setting `model_registry`) as a dict
    {"version", "model_uri", "name"}; it fails without retries when the registry holds none."""
    from airflow.sdk import get_current_context, task

    @task(task_id=task_id)
    def latest_model() -> dict[str, str]:
        """The newest version in the registry; fails when the registry holds none."""
        from ..registry import list_versions

        registry = config.resolve("model_registry", get_current_context()["params"])
        versions = list_versions(registry, config.REGISTRY_MODEL_FILE)
        if not versions:
            from airflow.sdk.exceptions import AirflowFailException

            # Nothing to compress is a configuration problem a retry will not fix.
            raise AirflowFailException(f"no model version under {registry} (expected {registry}/<version>/{config.REGISTRY_MODEL_FILE})")
        return versions[-1].as_dict()

    return latest_model()
