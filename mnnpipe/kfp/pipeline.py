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
from .interface import OUTPUT_METRICS, OUTPUT_MODEL, step_interface
from .recipe import RELEASE_STEP, parse_recipe, pipeline_steps, recipe_digest, section, wired_model_field, wired_value

PIPELINE_NAME = "mnnpipe-compress"
DEFAULT_STORE_PREFIX = "s3://mnnpipe/runs"
DEFAULT_RELEASE_ROOT = "s3://mnnpipe/released"


def dataset_parameters(recipe: Any) -> tuple[str, ...]:
    """`<field>_uri` pipeline parameters: one per dataset field of the steps the recipe runs."""
    names: list[str] = []
    for step in pipeline_steps():
        if getattr(recipe, step, None) is not None:
            names += [f"{f}_uri" for f in step_interface(step).dataset_inputs]
    return tuple(dict.fromkeys(names))


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

    from .components import make_component, with_task_defaults
    from .latest import LATEST, make_latest_component
    from .latest import OUTPUTS as LATEST_OUTPUTS

    recipe = parse_recipe(recipe, model_uri=model_uri)
    digest = recipe_digest(recipe)
    image = resolve_image(image)
    steps = [s for s in pipeline_steps() if getattr(recipe, s) is not None]
    data_params = dataset_parameters(recipe)
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
    source = recipe.model.model_dump(mode="json", exclude_unset=True)
    gate_spec = {**recipe.gate.model_dump(mode="json", exclude_unset=True), "recipe_digest": digest, "move_latest": True}

    def compress(*args: Any) -> None:
        p = dict(zip(defaults, args))
        if model_registry is not None:  # the newest version, resolved when the run starts
            latest = with_task_defaults(make_latest_component(form, image)(model_registry=p["model_registry"])).set_display_name(LATEST)
            p.update({name: latest.outputs[name] for name in LATEST_OUTPUTS})
        run_prefix = f"{p['store_prefix']}/{p['model_name']}/{p['model_version']}/{digest}"
        model_task = metrics_task = None
        for step in steps:
            iface = step_interface(step)
            spec = section(recipe, step)
            kwargs: dict[str, Any] = {"output_uri": f"{run_prefix}/{step}"}
            wired = wired_model_field(iface)
            if wired is not None:
                how = spec.get(wired) or {}  # how to read the wired model (format, factory), from the recipe
                if model_task is None:  # the first step reads the source model
                    spec[wired] = wired_value(iface, {**source, **how})
                    kwargs[f"{wired}_uri"] = p["model_uri"]
                else:
                    spec[wired] = wired_value(iface, how)  # the launcher fills in the artifact's uri
                    kwargs[wired] = model_task.outputs[OUTPUT_MODEL]
            for field in iface.dataset_inputs:
                kwargs[f"{field}_uri"] = p[f"{field}_uri"]
            task = make_component(step, form, image)(spec=json.dumps(spec, sort_keys=True), **kwargs)
            # Caching off: KFP's cache keys on parameter strings, not on the bytes behind model_uri (a
            # new model at the same URI would be served stale); mnnpipe's own cache is keyed on content.
            with_task_defaults(task).set_display_name(step)
            if iface.produces_model:
                model_task = task
            metrics_task = task
        gate = make_component(RELEASE_STEP, form, image)(
            spec=json.dumps(gate_spec, sort_keys=True),
            output_uri=f"{p['release_root']}/{p['model_name']}/{p['model_version']}/{digest}",
            candidate=model_task.outputs[OUTPUT_MODEL],
            candidate_metrics=metrics_task.outputs[OUTPUT_METRICS],
            # The model step's own metrics (e.g. quantize's fp32_accuracy) are the gate's reference.
            **({"reference_metrics": model_task.outputs[OUTPUT_METRICS]} if metrics_task is not model_task else {}),
        )
        with_task_defaults(gate).set_display_name(RELEASE_STEP)

    compress.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d, annotation=str) for n, d in defaults.items()]
    )
    compress.__doc__ = (
        f"Compress a model for MNN: {' -> '.join([*steps, 'gate'])} (recipe {digest}).\n\n"
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


def compile_pipeline(pipeline: Any, path: str) -> None:
    from kfp import compiler

    compiler.Compiler().compile(pipeline, path)
