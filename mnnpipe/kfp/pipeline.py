"""The `compress` pipeline: [distill] -> [prune] -> convert -> [quantize] -> [benchmark] -> gate.

Built from a validated recipe (see `recipe.py`); the recipe decides which optional steps exist and
is compiled into each task's `spec` parameter, so an invalid recipe fails here, at build/compile
time, never in a pod. Run-time parameters are the source model URI, the model's name and
version, the dataset URIs (one `<field>_uri` per dataset field of the steps present) and where
outputs go: each step publishes to `<store_prefix>/<name>/<version>/<recipe digest>/<step>` in the
step store (S3), and the gate releases to `<release_root>/<name>/<version>/<recipe digest>/`.

Order: convert precedes quantize because MNN's int8 quantizer reads an fp32 .mnn, which only the
converter makes; benchmark measures the last model produced; the gate reads the benchmark's
metrics (or the last step's when there is no benchmark).
"""

from __future__ import annotations

import inspect
import json
from typing import Any, Literal

from ..container import image_note, resolve_image
from ..recipe import SOURCE, Plan, plan
from ..release import TREND_STEP, trend_prefix
from .interface import OUTPUT_METRICS, OUTPUT_MODEL

PIPELINE_NAME = "mnnpipe-compress"
DEFAULT_STORE_PREFIX = "s3://mnnpipe/runs"
DEFAULT_RELEASE_ROOT = "s3://mnnpipe/released"
#: The parameters' defaults of the committed pipelines/compress.yaml (the digits example).
PIPELINE_DEFAULTS = {
    "model_uri": "s3://models/digits/1/model.pth",
    "model_name": "digits",
    "model_version": "1",
    "store_prefix": DEFAULT_STORE_PREFIX,
    "release_root": DEFAULT_RELEASE_ROOT,
}


def compress_pipeline(**overrides: Any) -> Any:
    """The compress pipeline with the default recipe (mnnpipe.default_recipe) and PIPELINE_DEFAULTS."""
    from ..default_recipe import DEFAULT_RECIPE

    return build_pipeline(DEFAULT_RECIPE, **{**PIPELINE_DEFAULTS, **overrides})


def dataset_parameters(recipe_plan: Plan) -> tuple[str, ...]:
    """`<field>_uri` pipeline parameters: one per dataset field of the steps the plan runs."""
    return tuple(dict.fromkeys(f"{f}_uri" for planned in recipe_plan.steps for f in planned.datasets))


def build_pipeline(
    recipe: Any,
    *,
    form: Literal["container", "lightweight"] = "container",
    image: str | None = None,
    model_uri: str = "",
    model_name: str = "model",
    model_version: str = "1",
    store_prefix: str = DEFAULT_STORE_PREFIX,
    release_root: str = DEFAULT_RELEASE_ROOT,
    pipeline_root: str | None = None,
    model_registry: str | None = None,
) -> Any:
    """The compress pipeline for `recipe` (validated first: SpecError names the bad field).

    Keyword defaults become the pipeline parameters' defaults. `form="lightweight"` builds it from
    lightweight components, for kfp.local (which cannot run container components). `image`: the
    step image of every task; None takes $MNNPIPE_IMAGE, else the package's default tag.

    `model_registry` (a prefix, for schedules): the pipeline takes a `model_registry` parameter
    instead of model_uri/model_name/model_version and resolves the newest version under it when
    each run starts (`latest.py`), so a recurring run always compresses the current model.
    """
    from kfp import dsl

    from .components import with_task_defaults
    from .latest import LATEST, make_latest_component
    from .latest import OUTPUTS as LATEST_OUTPUTS

    recipe_plan = plan(recipe, model_uri=model_uri)
    digest = recipe_plan.digest
    image = resolve_image(image)
    data_params = dataset_parameters(recipe_plan)
    model = {"model_registry": model_registry} if model_registry is not None else {
        "model_uri": model_uri,
        "model_name": model_name,
        "model_version": model_version,
    }
    defaults = {
        **model,
        "store_prefix": store_prefix,
        "release_root": release_root,
        **{p: "" for p in data_params},
    }

    def compress(*args: Any) -> None:
        p = dict(zip(defaults, args))
        if model_registry is not None:  # the newest version, resolved when the run starts
            latest = with_task_defaults(make_latest_component(form, image)(model_registry=p["model_registry"])).set_display_name(LATEST)
            p.update({name: latest.outputs[name] for name in LATEST_OUTPUTS})
        run_prefix = f"{p['store_prefix']}/{p['model_name']}/{p['model_version']}/{digest}"
        tasks = render_steps(recipe_plan, form=form, image=image, model_uri=p["model_uri"], run_prefix=run_prefix, dataset_uris=p)
        release = recipe_plan.release
        gate = render_release(
            release, candidate=tasks[release.candidate_from], metrics=tasks[release.metrics_from],
            reference=tasks[release.reference_from] if release.reference_from else None, form=form, image=image,
            output_uri=f"{p['release_root']}/{p['model_name']}/{p['model_version']}/{digest}",
        )  # fmt: skip
        render_trend(gate, form=form, image=image, release_root=p["release_root"], model_name=p["model_name"])

    compress.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d, annotation=str) for n, d in defaults.items()]
    )
    compress.__doc__ = (
        f"Compress a model for MNN: {' -> '.join([*(s.step for s in recipe_plan.steps), recipe_plan.release.step])} (recipe {digest}).\n\n"
        "Args:\n"
        + (
            "    model_registry: Registry prefix; the newest {model_registry}/<version>/model.<ext> is compressed.\n"
            if model_registry is not None
            else "    model_uri: URI of the source model (s3://... or path).\n"
            "    model_name: Model name; part of the output and release prefixes.\n"
            "    model_version: Model version; part of the output and release prefixes.\n"
        )
        + "    store_prefix: Step-store prefix the steps publish under (s3://bucket/prefix).\n"
        "    release_root: Where the gate releases: <release_root>/<name>/<version>/<recipe digest>/.\n"
        + "".join(f"    {d}: URI of the dataset for spec field `{d[:-4]}` ('' keeps the recipe's).\n" for d in data_params)
    )
    description = f"{compress.__doc__.split(chr(10))[0]} {image_note(image)}"
    return dsl.pipeline(name=PIPELINE_NAME, description=description, pipeline_root=pipeline_root)(compress)


def render_steps(
    recipe_plan: Any, *, form: str, image: str, model_uri: Any, run_prefix: str, dataset_uris: dict[str, Any], spec_of: Any = None,
    subpath_of: Any = None,
) -> dict[str, Any]:
    """One task per planned step, wired: each step publishes to `<run_prefix>/<step>`; a wire
    from the source takes `model_uri`, one from an earlier step that step's output model.
    `spec_of(planned)`: the task's spec parameter (default: the planned spec as JSON; a search
    passes its loop item's); `subpath_of(planned)`: the task's output_subpath (default: the step's
    name under run_prefix; a search passes its loop item's `<candidate>/<step>`). Returns the tasks
    by step name."""
    from .components import make_component, with_task_defaults

    tasks: dict[str, Any] = {}
    for planned in recipe_plan.steps:
        if subpath_of is None:
            kwargs: dict[str, Any] = {"output_uri": f"{run_prefix}/{planned.step}"}
        else:
            kwargs = {"output_uri": run_prefix, "output_subpath": subpath_of(planned)}
        for wire in planned.wires:
            field = wire.path[0]
            if wire.source == SOURCE:
                kwargs[f"{field}_uri"] = model_uri  # fills every wired item still without a uri
            elif len(wire.path) == 1:
                kwargs[field] = tasks[wire.source].outputs[OUTPUT_MODEL]
            else:
                kwargs[f"{field}_item{wire.path[1]}"] = tasks[wire.source].outputs[OUTPUT_MODEL]
        for field in planned.datasets:
            value = dataset_uris.get(f"{field}_uri")
            if value is not None:
                kwargs[f"{field}_uri"] = value
        spec = spec_of(planned) if spec_of is not None else json.dumps(planned.spec, sort_keys=True)
        task = make_component(planned.step, form, image)(spec=spec, **kwargs)
        # Caching off: KFP's cache keys on parameter strings, not on the bytes behind model_uri (a
        # new model at the same URI would be served stale); mnnpipe's own cache is keyed on content.
        with_task_defaults(task).set_display_name(planned.step)
        tasks[planned.step] = task
    return tasks


def render_trend(after: Any, *, form: str, image: str, release_root: Any, model_name: Any) -> Any:
    """The trend of the model's releases (trend.json, trend.html under
    `<release_root>/<name>/trend`), once `after` (the gate) has released."""
    from .components import make_component, with_task_defaults

    task = make_component(TREND_STEP, form, image)(
        spec="{}", release_root=release_root, name=model_name, output_uri=trend_prefix(release_root, model_name)
    )
    task.after(after)
    return with_task_defaults(task).set_display_name(TREND_STEP)


def render_release(
    release: Any, *, candidate: Any, metrics: Any, reference: Any = None, form: str, image: str, output_uri: Any, move_latest: bool = True
) -> Any:
    """The release gate (`release`: a plan's PlannedRelease): the `candidate` task's model, judged by
    the `metrics` task's metrics against the `reference` task's (e.g. quantize's own fp32_accuracy;
    None: the metrics task's own)."""
    from .components import make_component, with_task_defaults

    gate = make_component(release.step, form, image)(
        spec=json.dumps({**release.spec, "move_latest": move_latest}, sort_keys=True),
        output_uri=output_uri,
        candidate=candidate.outputs[OUTPUT_MODEL],
        candidate_metrics=metrics.outputs[OUTPUT_METRICS],
        **({"reference_metrics": reference.outputs[OUTPUT_METRICS]} if reference is not None else {}),
    )
    return with_task_defaults(gate).set_display_name(release.step)


def compile_pipeline(pipeline: Any, path: str) -> None:
    from kfp import compiler

    compiler.Compiler().compile(pipeline, path)
