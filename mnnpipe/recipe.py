"""The recipe: which steps a compression runs, with what parameters, and how they are wired.

One recipe object renders every orchestrator: `plan(recipe)` says, for each step, its spec
section and where each model input comes from (the source model or an earlier step's hand-off);
the KFP pipeline, the Airflow DAGs, the local runner (`mnnpipe.local`, the demo, search) only fill
those wires in their own way (a KFP artifact, an XCom template, a URI). A change of step order
or hand-off is made once, in the step catalog.

Each section of a recipe is a step's own Spec minus the fields the orchestrator wires (kind,
schema_version, output, the model input), built from `Spec.model_fields`, so no parameter is
re-typed here. A recipe is validated twice before anything runs: its shape by the Recipe model,
and each section by building the step's full Spec with the wired fields filled in (so the step's
own validators run too). Any problem is a SpecError naming `recipe.<step>.<field>`.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, Optional

from pydantic import Field, ValidationError, create_model

from . import catalog
from .errors import SpecError
from .specs import ENVELOPE_FIELDS, DatasetRef, ModelRef, Strict, fields_holding, list_item_model_field

#: Where a wire takes its model from when no earlier step hands one on.
SOURCE = "source"
#: Labels the benchmark gives the model a recipe produces and the source model beside it.
CANDIDATE_LABEL = "candidate"
SOURCE_LABEL = "source"
#: Release-step fields the recipe wires (the candidate and the metrics it is judged by) or sets.
RELEASE_WIRED = ("candidate", "candidate_metrics", "reference_metrics", "recipe_digest", "move_latest")
PLACEHOLDER_BUCKET = "s3://mnnpipe-validation"


def recipe_steps() -> tuple[catalog.StepDef, ...]:
    """The steps a recipe may hold, in the order they run (the catalog's stage order)."""
    return tuple(s for s in catalog.steps() if s.stage in catalog.RECIPE_STAGES)


def release_step() -> catalog.StepDef:
    """The step that ends every recipe: it releases the candidate within the recipe's budget."""
    found = [s for s in catalog.steps() if s.stage == "release"]
    if len(found) != 1:
        raise AssertionError(f"exactly one release step expected, found {[s.name for s in found]}")
    return found[0]


def model_list_item(step: catalog.StepDef) -> str | None:
    """For a model input that is a list of labelled items (benchmark's `models`): the item's
    ModelRef field; None for a plain ModelRef field."""
    if step.model_input is None:
        return None
    return list_item_model_field(step.spec.model_fields[step.model_input].annotation)


def _section_model(name: str, cls: type, exclude: set[str]) -> type:
    fields = {f: (info.annotation, info) for f, info in cls.model_fields.items() if f not in exclude}
    return create_model(name, __base__=Strict, __doc__=cls.__doc__, **fields)


def recipe_model() -> type:
    """The Recipe pydantic model for the steps registered here (built once per set of steps)."""
    return _recipe_model(catalog.steps())


@lru_cache(maxsize=8)
def _recipe_model(registered: tuple[catalog.StepDef, ...]) -> type:
    source = _section_model("SourceModel", ModelRef, {"uri"})
    source.__doc__ = "How to read the source model (its URI is given at run time): format, factory, factory_kwargs."
    fields: dict[str, Any] = {
        "model": (source, Field(default_factory=source, description="How to read the source model.")),
        "compare": (
            Literal["source", "every-step"],
            Field("source", description="What the benchmark measures beside the candidate: the source model, or also every intermediate model."),
        ),
    }
    for step in recipe_steps():
        wired = step.model_input
        section = _section_model(f"{catalog.class_name(step.name)}Recipe", step.spec, {*ENVELOPE_FIELDS, wired})
        if wired is not None and model_list_item(step) is None:
            # The URI is wired; how to read it (e.g. prune's `factory` for a TorchScript input) is not.
            section = create_model(
                section.__name__,
                __base__=section,
                **{wired: (Optional[source], Field(None, description=f"How to read the model handed to {step.name} (format, factory, factory_kwargs); its URI is wired."))},
            )
        if step.optional:
            fields[step.name] = (Optional[section], Field(None, description=f"Parameters of the {step.name} step (omit to skip it): {step.summary}"))
        else:
            fields[step.name] = (section, Field(description=f"Parameters of the {step.name} step: {step.summary}"))
    release = release_step()
    gate = _section_model(f"{catalog.class_name(release.name)}Recipe", release.spec, {*ENVELOPE_FIELDS, *RELEASE_WIRED})
    fields[release.name] = (gate, Field(description="The release gate: the budget the compressed model must meet."))
    return create_model("Recipe", __base__=Strict, __doc__="A validated compression recipe.", **fields)


def parse_recipe(data: Any, *, model_uri: str = "") -> Any:
    """Validate a recipe (dict, JSON/YAML text or Recipe) completely; SpecError names the field."""
    from .runner import format_validation_error

    cls = recipe_model()
    if isinstance(data, cls):
        recipe = data
    else:
        if isinstance(data, str):
            from .spectext import parse_spec_text

            data = parse_spec_text(data, "recipe")
        try:
            recipe = cls.model_validate(data)
        except ValidationError as e:
            raise SpecError(f"recipe.{format_validation_error(e)}") from None
    for step, spec in placeholder_specs(recipe, model_uri=model_uri).items():
        _validate_full(step, spec)
    return recipe


def _validate_full(step: str, data: dict[str, Any]) -> None:
    from .runner import parse_spec

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


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Wire:
    """A model input to fill: the path of a ModelRef in the step's spec, and where its model comes
    from (SOURCE, or the name of the earlier step whose hand-off it is)."""

    path: tuple[str | int, ...]
    source: str


@dataclass(frozen=True)
class PlannedStep:
    step: str
    #: The step's spec without output; at each wire's path a ModelRef without `uri` (how to read it).
    spec: dict[str, Any]
    wires: tuple[Wire, ...]
    #: Dataset fields of the step's spec (an orchestrator may bind their URIs at run time).
    datasets: tuple[str, ...]


@dataclass(frozen=True)
class PlannedRelease:
    """The release step: its spec (budget, digest), the step whose hand-off is the candidate, the
    step whose metrics judge it and the step whose metrics are the reference (None: the same)."""

    step: str
    spec: dict[str, Any]
    candidate_from: str
    metrics_from: str
    reference_from: str | None


@dataclass(frozen=True)
class Plan:
    steps: tuple[PlannedStep, ...]
    release: PlannedRelease
    digest: str

    def step(self, name: str) -> PlannedStep:
        return next(p for p in self.steps if p.step == name)


def plan(recipe: Any, *, model_uri: str = "") -> Plan:
    """The recipe's steps in order with their wires: what every orchestrator renders. The recipe
    is validated in full first (`parse_recipe`; `model_uri` as there)."""
    return _plan(parse_recipe(recipe, model_uri=model_uri))


def _plan(recipe: Any) -> Plan:
    source = recipe.model.model_dump(mode="json", exclude_unset=True)
    planned: list[PlannedStep] = []
    upstream = SOURCE  # the last step that handed on a model
    produced: list[str] = []  # every step that handed on a model, in order
    for step in recipe_steps():
        spec = section(recipe, step.name)
        if spec is None:
            continue
        wires: list[Wire] = []
        field = step.model_input
        item = model_list_item(step)
        if field is not None and item is None:
            how = spec.get(field) or {}
            spec[field] = {**(source if upstream == SOURCE else {}), **how}
            wires.append(Wire((field,), upstream))
        elif field is not None:
            chain = produced[:-1] if recipe.compare == "every-step" else []
            items = [(SOURCE_LABEL, SOURCE), *((name, name) for name in chain), (CANDIDATE_LABEL, upstream)]
            spec[field] = [{"label": label, item: dict(source) if origin == SOURCE else {}} for label, origin in items]
            wires += [Wire((field, i, item), origin) for i, (_, origin) in enumerate(items)]
            if "reference" in step.spec.model_fields and "reference" not in spec:
                # Fidelity and accuracy are judged against the uncompressed model.
                spec["reference"] = SOURCE_LABEL
        planned.append(PlannedStep(step.name, spec, tuple(wires), fields_holding(step.spec, DatasetRef)))
        if step.hands_on is not None:
            upstream = step.name
            produced.append(step.name)
    release = release_step()
    metrics_from = planned[-1].step
    digest = recipe_digest(recipe)
    gate = {**section(recipe, release.name), "recipe_digest": digest}
    return Plan(
        steps=tuple(planned),
        release=PlannedRelease(release.name, gate, upstream, metrics_from, upstream if metrics_from != upstream else None),
        digest=digest,
    )


def wired_spec(planned: PlannedStep, uris: dict[str, str], *, output: str, datasets: dict[str, str] | None = None) -> dict[str, Any]:
    """The planned step's spec with each wire's `uri` set from `uris` (SOURCE or a step name ->
    its model's URI, which may be a template) and dataset URIs bound where given."""
    spec = copy.deepcopy(planned.spec)
    for wire in planned.wires:
        node: Any = spec
        for part in wire.path[:-1]:
            node = node[part]
        node[wire.path[-1]] = {**node[wire.path[-1]], "uri": uris[wire.source]}
    for field in planned.datasets:
        if datasets and datasets.get(field) and isinstance(spec.get(field), dict):
            spec[field] = {**spec[field], "uri": datasets[field]}
    spec["output"] = output
    return spec


def release_spec(planned: PlannedRelease, *, candidate_uri: str, candidate_metrics: dict[str, float], reference_metrics: dict[str, float] | None, output: str, move_latest: bool) -> dict[str, Any]:
    return {
        **planned.spec,
        "candidate": {"uri": candidate_uri},
        "candidate_metrics": dict(candidate_metrics),
        "reference_metrics": dict(reference_metrics or {}),
        "output": output,
        "move_latest": move_latest,
    }


def handoff_artifact(step: str) -> str:
    """The artifact `step` hands on (a path under its output, e.g. 'model.mnn')."""
    hands_on = catalog.get(step).hands_on
    if hands_on is None:
        raise SpecError(f"step {step} hands no model on")
    return hands_on.artifact


def handoff_uri(result: Any, step: str) -> str:
    """The URI of what `step` handed on, from its Result (a StepResult, or one as a dict: XCom)."""
    name = handoff_artifact(step)
    return result["artifacts"][name]["uri"] if isinstance(result, dict) else result.artifacts[name].uri


def placeholder_specs(recipe: Any, *, model_uri: str = "") -> dict[str, dict[str, Any]]:
    """Each present step's full spec with the wired fields filled with representative
    placeholders: what build-time validation checks."""
    source = recipe.model.model_dump(mode="json", exclude_unset=True)
    fmt = source.get("format", "auto")
    uris = {SOURCE: model_uri or f"{PLACEHOLDER_BUCKET}/source/model{catalog.EXTENSIONS.get(fmt, '.pt')}"}
    recipe_plan = _plan(recipe)
    specs: dict[str, dict[str, Any]] = {}
    for planned in recipe_plan.steps:
        if catalog.get(planned.step).hands_on is not None:
            uris[planned.step] = f"{PLACEHOLDER_BUCKET}/runs/{planned.step}/{handoff_artifact(planned.step)}"
        datasets = {
            f: f"{PLACEHOLDER_BUCKET}/data/{f}"  # the `<field>_uri` parameter a KFP run binds
            for f in planned.datasets
            if isinstance(ref := planned.spec.get(f), dict) and not ref.get("uri") and ref.get("format") not in (None, "sklearn-digits")
        }
        specs[planned.step] = wired_spec(planned, uris, output=f"{PLACEHOLDER_BUCKET}/runs/{planned.step}", datasets=datasets)
    gate = recipe_plan.release.spec
    # The metrics are wired at run time; placeholders only let the spec validate.
    placeholder_metrics = {gate.get("metric", ""): 0.0, **({gate["reference_metric"]: 0.0} if gate.get("reference_metric") else {})}
    specs[recipe_plan.release.step] = release_spec(
        recipe_plan.release, candidate_uri=uris[recipe_plan.release.candidate_from], candidate_metrics=placeholder_metrics,
        reference_metrics=None, output=f"{PLACEHOLDER_BUCKET}/released", move_latest=False,
    )  # fmt: skip
    return specs
