"""The compression recipe: which steps the `compress` pipeline runs and with what parameters.

Each section is a step's own Spec minus the fields the pipeline wires (kind, schema_version,
output and the model input fed by the previous step), built from `Spec.model_fields`, so no
parameter is re-typed here. A recipe is validated twice before any pod starts: its shape by the
Recipe model, and each section by building the step's full Spec with the wired fields filled in
(so the step's own validators run too). Any problem is a SpecError naming `recipe.<step>.<field>`.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from typing import Any, Optional

from pydantic import Field, ValidationError, create_model

from ..errors import SpecError
from ..specs import ModelRef, Strict
from ..steps import STEP_NAMES
from .interface import ENVELOPE_FIELDS, StepInterface, step_interface

#: The order steps run in. Convert comes before quantize because MNN's int8 quantizer
#: (mnnquant) reads an fp32 .mnn, which only the converter makes.
PIPELINE_ORDER = ("distill", "prune", "convert", "quantize", "benchmark")
#: Steps a recipe must have: convert makes the .mnn that is released.
REQUIRED_STEPS = ("convert",)
#: The kind of file each model-producing step hands to the next one; used only to fill the wired
#: model input with a representative URI when a recipe is validated at build time.
HANDS_ON = {"distill": "torchscript", "prune": "torchscript", "convert": "mnn", "quantize": "mnn"}
_EXT = {"torchscript": ".pt", "torch-export": ".pt2", "state-dict": ".pth", "onnx": ".onnx", "mnn": ".mnn"}
PLACEHOLDER_BUCKET = "s3://mnnpipe-validation"
#: The step that ends every pipeline: it releases the last model within the recipe's budget.
RELEASE_STEP = "gate"
#: Gate fields the pipeline wires (the candidate model and the metrics it is judged by) or sets.
GATE_WIRED = ("candidate", "candidate_metrics", "reference_metrics", "recipe_digest", "move_latest")


def pipeline_steps() -> tuple[str, ...]:
    """The steps of PIPELINE_ORDER that this installation provides (importable modules)."""
    out = []
    for name in PIPELINE_ORDER:
        assert name in STEP_NAMES
        try:
            step_interface(name)
        except ImportError:
            continue
        out.append(name)
    return tuple(out)


def component_steps() -> list[str]:
    """Every step that gets a KFP component: the pipeline's steps, then the release gate."""
    return [*pipeline_steps(), RELEASE_STEP]


def wired_model_field(iface: StepInterface) -> str | None:
    """The model input the previous step feeds: the Spec's first ModelRef field."""
    return iface.model_inputs[0] if iface.model_inputs else None


#: How a list-of-models field (benchmark's `models`) names the model the pipeline hands it.
CANDIDATE_LABEL = "candidate"


def wired_value(iface: StepInterface, ref: dict[str, Any]) -> Any:
    """The spec value of the wired model field: the ref itself, or a one-item list of
    {label: candidate, <model field>: ref} when the field is a list of labelled models."""
    wired = wired_model_field(iface)
    sub = dict(iface.model_lists).get(wired)
    return ref if sub is None else [{"label": CANDIDATE_LABEL, sub: ref}]


def _section_model(name: str, cls: type, exclude: set[str]) -> type:
    fields = {f: (info.annotation, info) for f, info in cls.model_fields.items() if f not in exclude}
    return create_model(name, __base__=Strict, __doc__=cls.__doc__, **fields)


@lru_cache(maxsize=None)
def recipe_model() -> type:
    """The Recipe pydantic model for the steps available here (built once)."""
    source = _section_model("SourceModel", ModelRef, {"uri"})
    source.__doc__ = "How to read the model at `model_uri` (a pipeline parameter): format, factory, factory_kwargs."
    fields: dict[str, Any] = {
        "model": (source, Field(default_factory=source, description="How to read the source model given by model_uri.")),
    }
    for step in pipeline_steps():
        iface = step_interface(step)
        wired = wired_model_field(iface)
        section = _section_model(f"{step.capitalize()}Recipe", iface.spec_cls, {*ENVELOPE_FIELDS, wired})
        if wired is not None and wired not in dict(iface.model_lists):
            # The URI is wired; how to read it (e.g. prune's `factory` for a TorchScript input) is not.
            section = create_model(
                section.__name__,
                __base__=section,
                **{wired: (Optional[source], Field(None, description=f"How to read the model the previous step hands to {step} (format, factory, factory_kwargs); its URI is wired by the pipeline."))},
            )
        if step in REQUIRED_STEPS:
            fields[step] = (section, Field(description=f"Parameters of the {step} step: {iface.summary}"))
        else:
            fields[step] = (Optional[section], Field(None, description=f"Parameters of the {step} step (omit to skip it): {iface.summary}"))
    gate = _section_model("GateRecipe", step_interface(RELEASE_STEP).spec_cls, {*ENVELOPE_FIELDS, *GATE_WIRED})
    fields["gate"] = (gate, Field(description="The release gate: the accuracy budget the compressed model must meet."))
    return create_model("Recipe", __base__=Strict, __doc__="A validated compression recipe for the compress pipeline.", **fields)


def _prefixed(e: ValidationError, prefix: str) -> str:
    from ..runner import format_validation_error

    return f"{prefix}.{format_validation_error(e)}"


def parse_recipe(data: Any, *, model_uri: str = "") -> Any:
    """Validate a recipe (dict, JSON/YAML text or Recipe) completely; SpecError names the field."""
    cls = recipe_model()
    if isinstance(data, cls):
        recipe = data
    else:
        if isinstance(data, str):
            from ..spectext import parse_spec_text

            data = parse_spec_text(data, "recipe")
        try:
            recipe = cls.model_validate(data)
        except ValidationError as e:
            raise SpecError(_prefixed(e, "recipe")) from None
    for step, spec in step_specs(recipe, model_uri=model_uri).items():
        _validate_full(step, spec)
    return recipe


def _validate_full(step: str, data: dict[str, Any]) -> None:
    from ..runner import parse_spec

    try:
        parse_spec(step, data)
    except SpecError as e:
        raise SpecError(f"recipe.{step}.{e}") from None


def recipe_digest(recipe: Any) -> str:
    """16 hex digits identifying a recipe (every value, defaults included): the release marker key."""
    body = json.dumps(recipe.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def section(recipe: Any, step: str) -> dict[str, Any] | None:
    value = getattr(recipe, step, None)
    # exclude_unset: the step applies its own defaults, and a spec stays as short as it was written.
    return None if value is None else value.model_dump(mode="json", exclude_unset=True)


def step_specs(recipe: Any, *, model_uri: str = "") -> dict[str, dict[str, Any]]:
    """Each present step's full spec as the launcher will see it at run time, with the wired fields
    (output, the upstream model, dataset URIs that are pipeline parameters) filled with
    representative placeholders. Used to validate at build time."""
    specs: dict[str, dict[str, Any]] = {}
    source = recipe.model.model_dump(mode="json", exclude_unset=True)
    fmt = source.get("format", "auto")
    upstream_uri = model_uri or f"{PLACEHOLDER_BUCKET}/source/model{_EXT.get(fmt, '.pt')}"
    upstream_ref: dict[str, Any] = {**source, "uri": upstream_uri}
    for step in pipeline_steps():
        data = section(recipe, step)
        if data is None:
            continue
        iface = step_interface(step)
        data["output"] = f"{PLACEHOLDER_BUCKET}/runs/{step}"
        wired = wired_model_field(iface)
        if wired is not None:
            data[wired] = wired_value(iface, {**upstream_ref, **(data.get(wired) or {})})
        for field in iface.dataset_inputs:
            ref = data.get(field)
            if isinstance(ref, dict) and not ref.get("uri") and ref.get("format") not in (None, "sklearn-digits"):
                ref["uri"] = f"{PLACEHOLDER_BUCKET}/data/{field}"  # the `<field>_uri` pipeline parameter
        specs[step] = data
        if step in HANDS_ON:
            upstream_ref = {"uri": f"{PLACEHOLDER_BUCKET}/runs/{step}/model{_EXT[HANDS_ON[step]]}"}
    gate = recipe.gate.model_dump(mode="json", exclude_unset=True)
    # The benchmark's metrics are wired at run time; the placeholders only let the spec validate.
    placeholder_metrics = {gate.get("metric", ""): 0.0, **({gate["reference_metric"]: 0.0} if gate.get("reference_metric") else {})}
    specs[RELEASE_STEP] = {
        **gate,
        "candidate": {"uri": upstream_ref["uri"]},
        "candidate_metrics": placeholder_metrics,
        "output": f"{PLACEHOLDER_BUCKET}/released",
    }
    return specs
