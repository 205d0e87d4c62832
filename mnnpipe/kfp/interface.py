"""What a step looks like to an orchestrator, read off its Spec and Result classes.

A ModelRef field of a Spec becomes a Model artifact input (plus a `<field>_uri` string input for
URIs that are pipeline parameters); a DatasetRef field becomes a Dataset artifact input (plus
`<field>_uri`); a `dict[str, float]` field (metric values) becomes a Metrics artifact input. Nothing here is declared per step: adding a field to a Spec changes the component.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ..specs import ENVELOPE_FIELDS, DatasetRef, ModelRef, fields_holding, holds, list_item_model_field  # noqa: F401  (ENVELOPE_FIELDS: public here too)
from .. import catalog

#: Output artifact names of every generated component (inputs are named after Spec fields).
OUTPUT_MODEL = "output_model"
OUTPUT_METRICS = "metrics"
OUTPUT_REPORT = "report"
#: File extensions of model artifacts, best first: the step's primary output model is the
#: published artifact with the first of these (an .mnn beats the .onnx it was converted from).
MODEL_EXTENSIONS = (".mnn", ".pt", ".pt2", ".pth", ".onnx")
#: How many items of a model list (benchmark's `models`) get an artifact input of their own,
#: `<field>_item0` ... : enough for a recipe comparing the source and every step's model (compare: every-step).
LIST_ITEM_INPUTS = 6


@dataclass
class ArtifactRef:
    """An artifact as the launcher sees it: KFP's URI, the local path and its metadata."""

    uri: str
    path: str
    metadata: dict[str, Any] = field(default_factory=dict)


def input_uri(artifact: ArtifactRef) -> str:
    """The URI a step reads an input artifact from: the producer's published URI in the step
    store when an mnnpipe component made it (verified against its manifest), else the local path."""
    return str(artifact.metadata.get("mnnpipe_uri") or artifact.path)


@dataclass(frozen=True)
class StepInterface:
    """The orchestrator-facing shape of one step."""

    name: str
    spec_cls: type
    result_cls: type
    model_inputs: tuple[str, ...]
    dataset_inputs: tuple[str, ...]
    produces_model: bool
    #: list fields of items that hold a model (e.g. benchmark's `models: list[ModelUnderTest]`):
    #: field -> the item's ModelRef field. A connected artifact fills every item without a uri.
    model_lists: tuple[tuple[str, str], ...] = ()
    #: metric-value fields (`dict[str, float]`, e.g. the gate's `candidate_metrics`): each is a
    #: Metrics artifact input whose values fill the field.
    metrics_inputs: tuple[str, ...] = ()
    #: fan-in inputs of a list of items (e.g. the select step's `candidates`): (input name, list
    #: field, the item's field, "model" | "metrics"). A list of artifacts (`dsl.Collected` of a
    #: ParallelFor) fills that field of item i from artifact i; the spec lists the items.
    collected_inputs: tuple[tuple[str, str, str, str], ...] = ()

    @property
    def ref_inputs(self) -> tuple[str, ...]:
        return self.model_inputs + self.dataset_inputs

    @property
    def item_inputs(self) -> tuple[tuple[str, str, int, str], ...]:
        """(input name, list field, item index, the item's model field) for each per-item
        Model artifact input, e.g. ('models_item1', 'models', 1, 'model')."""
        return tuple((f"{field}_item{i}", field, i, sub) for field, sub in self.model_lists for i in range(LIST_ITEM_INPUTS))

    @property
    def summary(self) -> str:
        return catalog.get(self.name).summary

    def uri_param(self, field: str) -> str:
        return f"{field}_uri"

    def required_refs(self) -> tuple[str, ...]:
        return tuple(f for f in self.ref_inputs if self.spec_cls.model_fields[f].is_required())


_SCALARS = {int: "int", float: "float", bool: "bool", str: "str"}


def _scalar_type(annotation: Any) -> str | None:
    """The KFP parameter type of a scalar field (int, float, bool, str or a str Literal; Optional
    of those), else None."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar_type(args[0]) if len(args) == 1 else None
    if origin is typing.Literal:
        return "str" if all(isinstance(v, str) for v in typing.get_args(annotation)) else None
    return _SCALARS.get(annotation)


def setting_fields(spec_cls: type) -> tuple[tuple[str, str], ...]:
    """(field, KFP type) of each top-level scalar field of a Spec: typed component parameters
    beside the JSON `spec` (set one, and it overrides the spec's value)."""
    return tuple(
        (name, kind) for name, info in spec_cls.model_fields.items() if name not in ENVELOPE_FIELDS and (kind := _scalar_type(info.annotation))
    )


def _is_metric_values(annotation: Any) -> bool:
    return typing.get_origin(annotation) is dict and typing.get_args(annotation) == (str, float)


def _collected_inputs(fields: dict[str, Any]) -> tuple[tuple[str, str, str, str], ...]:
    out = []
    for field, info in fields.items():
        if typing.get_origin(info.annotation) not in (list, tuple):
            continue
        args = [a for a in typing.get_args(info.annotation) if a is not Ellipsis]
        item_fields = getattr(args[0], "model_fields", {}) if len(args) == 1 else {}
        for sub, sub_info in item_fields.items():
            if holds(sub_info.annotation, ModelRef):
                out.append((f"{field}_{sub}", field, sub, "model"))
            elif _is_metric_values(sub_info.annotation):
                out.append((f"{field}_{sub}", field, sub, "metrics"))
    return tuple(out)


def step_interface(name: str) -> StepInterface:
    step = catalog.get(name)
    fields = step.spec.model_fields
    lists = tuple((f, sub) for f, info in fields.items() if (sub := list_item_model_field(info.annotation)))
    list_names = {f for f, _ in lists}
    models = tuple(f for f, info in fields.items() if holds(info.annotation, ModelRef) or f in list_names)
    datasets = fields_holding(step.spec, DatasetRef)
    return StepInterface(
        name=name,
        spec_cls=step.spec,
        result_cls=step.result,
        model_inputs=models,
        dataset_inputs=datasets,
        produces_model=step.hands_on is not None or step.stage == "release",
        model_lists=lists,
        metrics_inputs=tuple(f for f, info in fields.items() if _is_metric_values(info.annotation)),
        collected_inputs=_collected_inputs(fields),
    )
