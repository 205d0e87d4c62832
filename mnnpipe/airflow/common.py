"""What the in-worker operators (operators.py) and the pod operators (pod.py) share: the spec
check at DAG parse time (Jinja templates allowed), the environment and resource checks, the
one-line result summary and the class names. No Airflow import here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import InputError, SpecError
from ..specs import StepSpec, validation_error_line
from .. import catalog

PULL_POLICIES: tuple[str, ...] = ("Always", "IfNotPresent", "Never")
#: Where KubernetesPodOperator's xcom sidecar reads a task's return value from.
POD_RESULT_PATH = "/airflow/xcom/return.json"
#: Requests and limits of a step's pod unless the operator is given others.
DEFAULT_RESOURCES: dict[str, dict[str, str]] = {
    "requests": {"cpu": "1", "memory": "2Gi"},
    "limits": {"cpu": "2", "memory": "4Gi"},
}
# Values of these variables must reach a pod through a Kubernetes Secret, never inline in its spec.
_SECRET_NAME_RE = re.compile(r"SECRET|PASSWORD|TOKEN|CREDENTIAL|PRIVATE_KEY|ACCESS_KEY", re.IGNORECASE)
_TEMPLATE_RE = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.DOTALL)
# Stands in for a Jinja expression while a spec is validated at parse time: a plain path
# segment, so `s3://bucket/{{ ds }}/model.pt` still validates as an s3:// URI of a .pt file.
_TEMPLATE_STAND_IN = "templated"


def _without_templates(value: Any) -> Any:
    if isinstance(value, str):
        return _TEMPLATE_RE.sub(_TEMPLATE_STAND_IN, value)
    if isinstance(value, Mapping):
        return {k: _without_templates(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_templates(v) for v in value]
    return value


def has_templates(value: Any) -> bool:
    """True if any string in `value` (nested dicts and lists included) holds a Jinja expression."""
    return _without_templates(value) != value


def _has_whole_templates(value: Any) -> bool:
    """True if a string in `value` is nothing but a Jinja expression: its type and shape are
    unknown until it is rendered (a partial template keeps the shape of the text around it)."""
    if isinstance(value, str):
        return _TEMPLATE_RE.sub("", value).strip() == "" and _TEMPLATE_RE.search(value) is not None
    if isinstance(value, Mapping):
        return any(_has_whole_templates(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_whole_templates(v) for v in value)
    return False


def _value_at(data: Any, loc: Sequence[Any]) -> Any:
    """The part of `data` a pydantic error location points to (union tags in `loc` are skipped)."""
    node = data
    for part in loc:
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
    return node


def spec_dict(step: str, spec: StepSpec | Mapping[str, Any]) -> dict[str, Any]:
    """Validate `spec` for `step` as far as is possible before templates are rendered.

    A string that is partly a template is checked with each expression replaced by a plain path
    segment, so `s3://bucket/{{ ds }}/model.zip` is still rejected now (at DAG parse time). A value
    that is wholly a template (`{{ params.epochs }}`), and any object holding one, can only be
    checked after rendering. Returns the spec as a JSON-able dict, templates kept, for Airflow to render.
    Raises SpecError naming the first invalid field.
    """
    from pydantic import ValidationError

    spec_cls = catalog.get(step).spec
    if isinstance(spec, StepSpec):
        if not isinstance(spec, spec_cls):
            raise SpecError(f"spec: expected a {step} spec ({spec_cls.__module__}.Spec), got {type(spec).__module__}.{type(spec).__name__}")
        return spec.model_dump(mode="json")
    if not isinstance(spec, Mapping):
        raise SpecError(f"spec: expected a {step} Spec or a mapping of its fields, got {type(spec).__name__}")
    data = json.loads(json.dumps(dict(spec)))  # a plain JSON copy: tuples to lists, no shared state
    kind = data.setdefault("kind", step)
    if kind != step:
        raise SpecError(f"kind: spec is for step '{kind}', not '{step}'")
    try:
        spec_cls.model_validate(_without_templates(data))
    except ValidationError as e:
        for error in e.errors(include_url=False):
            if _has_whole_templates(_value_at(data, error["loc"])):
                continue  # depends on a template: checked once it is rendered
            raise SpecError(f"spec.{validation_error_line(error)}") from None
    return data


def _check_env(env_vars: Mapping[str, str]) -> dict[str, str]:
    for name, value in env_vars.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise SpecError(f"env_vars: '{name}' is not a valid environment variable name")
        if _SECRET_NAME_RE.search(name):
            raise SpecError(
                f"env_vars: '{name}' looks like a credential; put it in a Kubernetes Secret and name the "
                "secret in secret_env_from, so its value never appears in the pod spec"
            )
        if not isinstance(value, str):
            raise SpecError(f"env_vars: value of '{name}' must be a string, got {type(value).__name__}")
    return dict(env_vars)


def _check_resources(resources: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for kind, values in resources.items():
        if kind not in ("requests", "limits"):
            raise SpecError(f"container_resources: unknown key '{kind}'; expected 'requests' and/or 'limits'")
        for res, qty in values.items():
            if not isinstance(qty, str) or not re.fullmatch(r"[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?", qty):
                raise SpecError(f"container_resources.{kind}.{res}: '{qty}' is not a Kubernetes quantity (e.g. '500m', '2', '4Gi')")
        out[kind] = dict(values)
    return out


# Words of metric names an operator looks for first, in this order: size, fidelity, accuracy, time.
_SUMMARY_WORDS = ("size", "ratio", "cosine", "agreement", "error", "accuracy", "top1", "drop", "seconds", "mean")
_SUMMARY_MAX = 8


def summary_line(step: str, result: Any) -> str:
    """One line with the step's headline metrics, e.g. `convert summary: size_bytes=77756 cosine=1 ...`."""

    def rank(name: str) -> int | None:
        words = re.split(r"[/_.]", name.lower())
        return next((i for i, word in enumerate(_SUMMARY_WORDS) if word in words), None)

    metrics = getattr(result, "metrics", {}) or {}
    picked = sorted((rank(k), k, v) for k, v in metrics.items() if rank(k) is not None)
    shown = " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for _, k, v in picked[:_SUMMARY_MAX])
    more = f" (+{len(picked) - _SUMMARY_MAX} more in the result)" if len(picked) > _SUMMARY_MAX else ""
    cached = " cached" if getattr(result, "cached", False) else ""
    return f"{step} summary:{cached} {shown or 'no metrics'}{more} -> {getattr(result, 'output', '')}"



def operator_class_name(step: str) -> str:
    return f"Mnn{catalog.class_name(step)}Operator"
