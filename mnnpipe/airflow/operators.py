"""One Airflow operator per mnnpipe step, generated from the step's Spec.

    from mnnpipe.airflow.operators import MnnConvertOperator

    MnnConvertOperator(
        task_id="convert",
        spec={"model": {"uri": "s3://models/{{ ds_nodash }}/model.pt"}, "output": "s3://out/{{ ds }}/convert", ...},
        execution="kubernetes",          # or "in_process"
    )

- `spec` is the step's Spec (an instance, or a dict of its fields). It is validated when the DAG
  file is parsed; Jinja expressions in string values (URIs, dates, `{{ params.epochs }}`) are
  rendered at run time and the rendered spec is validated in full before anything runs. At parse
  time a templated value (and the object holding it) is checked only as far as its template
  allows: `s3://bucket/{{ ds }}/model.pt` still has to be an s3:// URI of a .pt file.
- `execution` is the one switch: "in_process" calls `mnnpipe.runner.run_step` in the worker;
  "kubernetes" runs the same step in the step image through a KubernetesPodOperator: the KFP
  components' image and the step's CLI command, both from `mnnpipe.container`. Either way the step's
  Result, as a dict, is the task's return value (XCom).
- Invalid specs and missing inputs (mnnpipe exit code 2) fail the task without retries: retrying
  cannot fix them. Tool and store failures are ordinary failures and retry as configured.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from airflow.sdk import BaseOperator

from ..container import resolve_image, step_command
from ..errors import InputError, SpecError
from ..specs import StepSpec
from ..steps import STEP_NAMES, step_module

if TYPE_CHECKING:
    from airflow.sdk import Context

Execution = Literal["in_process", "kubernetes"]
EXECUTIONS: tuple[str, ...] = ("in_process", "kubernetes")
PULL_POLICIES: tuple[str, ...] = ("Always", "IfNotPresent", "Never")
KUBERNETES_EXTRA_MISSING = (
    "execution 'kubernetes' needs apache-airflow-providers-cncf-kubernetes (pip install 'mnnpipe[k8s]'); "
    "use execution='in_process' to run the step in the worker"
)

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

    spec_cls = step_module(step).Spec
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
            loc = ".".join(str(p) for p in error["loc"]) or "spec"
            msg = "unknown field (not part of this step's spec)" if error["type"] == "extra_forbidden" else error["msg"].removeprefix("Value error, ")
            raise SpecError(f"spec.{loc}: {msg}") from None
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


#: Seconds between "still running" lines while a step runs in the worker: a task log is never
#: silent for longer, so an operator can tell a slow step from a hung one.
HEARTBEAT_S = 20.0


@contextlib.contextmanager
def heartbeat(log: Any, step: str, every: float | None = None) -> Iterator[None]:
    """Log `<step> still running (N s)` every `every` seconds (HEARTBEAT_S) until the block ends."""
    interval = HEARTBEAT_S if every is None else every
    done = threading.Event()
    started = time.monotonic()

    def beat() -> None:
        while not done.wait(interval):
            log.info("%s still running (%.0f s)", step, time.monotonic() - started)

    thread = threading.Thread(target=beat, name=f"mnnpipe-heartbeat-{step}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=5)


def kubernetes_provider_installed() -> bool:
    return importlib.util.find_spec("airflow.providers.cncf.kubernetes") is not None


class MnnStepOperator(BaseOperator):
    """Run one mnnpipe step; subclasses (one per step, generated below) set `step`.

    :param spec: the step's Spec, or a dict of its fields; Jinja templates allowed in strings.
    :param execution: "in_process" (run in the worker) or "kubernetes" (run in the step image).
    :param use_cache: serve an identical earlier run's published output instead of recomputing.
    :param image: step image for "kubernetes" (default: $MNNPIPE_IMAGE, else the package's tag).
    :param namespace: Kubernetes namespace of the step's pod.
    :param container_resources: {"requests": {...}, "limits": {...}} of the step's container
        (named as KubernetesPodOperator names it; BaseOperator's `resources` is another thing).
    :param env_vars: non-secret environment of the step's container (e.g. MNNPIPE_S3_ENDPOINT_URL).
    :param secret_env_from: names of Kubernetes Secrets whose keys become the container's
        environment (S3 credentials); only the names appear in the pod spec.
    :param kubernetes_kwargs: further KubernetesPodOperator arguments (service_account_name,
        node_selector, tolerations, config_file, in_cluster, ...).
    """

    step: ClassVar[str] = ""
    template_fields: Sequence[str] = ("spec", "image", "namespace", "env_vars")
    template_fields_renderers: ClassVar[dict[str, str]] = {"spec": "json", "env_vars": "json"}
    ui_color = "#d6ecff"

    def __init__(
        self,
        *,
        spec: StepSpec | Mapping[str, Any],
        execution: Execution = "kubernetes",
        use_cache: bool = True,
        image: str | None = None,
        namespace: str = "default",
        container_resources: Mapping[str, Mapping[str, str]] | None = None,
        env_vars: Mapping[str, str] | None = None,
        secret_env_from: Sequence[str] = (),
        kubernetes_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not self.step:
            raise TypeError("MnnStepOperator is a base class; use the operator of a step, e.g. MnnConvertOperator")
        if execution not in EXECUTIONS:
            raise SpecError(f"execution: expected one of {', '.join(EXECUTIONS)}, got '{execution}'")
        if execution == "kubernetes" and not kubernetes_provider_installed():
            raise SpecError(KUBERNETES_EXTRA_MISSING)
        self.spec = spec_dict(self.step, spec)
        self.execution = execution
        self.use_cache = use_cache
        self.image = resolve_image(image)
        self.namespace = namespace
        self.container_resources = _check_resources(DEFAULT_RESOURCES if container_resources is None else container_resources)
        self.env_vars = _check_env(env_vars or {})
        self.secret_env_from = list(secret_env_from)
        self.kubernetes_kwargs = dict(kubernetes_kwargs or {})

    # ------------------------------------------------------------------ run time

    def validated_spec(self) -> StepSpec:
        """The (rendered) spec, fully validated."""
        from ..runner import parse_spec

        if has_templates(self.spec):
            raise SpecError(f"spec of task '{self.task_id}' still holds unrendered templates: {json.dumps(self.spec)}")
        return parse_spec(self.step, self.spec)

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowFailException

        try:
            spec = self.validated_spec()
            if self.execution == "in_process":
                from ..runner import run_step

                with heartbeat(self.log, self.step):
                    result = run_step(self.step, spec, use_cache=self.use_cache, quiet=True)
            else:
                raw = self.build_pod_operator(spec).execute(context)
                result = step_module(self.step).Result.model_validate(raw)
        except (SpecError, InputError) as e:
            # A wrong spec or a missing input stays wrong on every retry.
            raise AirflowFailException(f"{self.step}: {e}") from e
        self.log.info("%s published %d artifact(s) to %s (cached: %s)", self.step, len(result.artifacts), result.output, result.cached)
        self.log.info("%s", summary_line(self.step, result))  # last line of the task log: what an operator reads first
        return result.model_dump(mode="json")

    # ------------------------------------------------------------------ kubernetes

    def pod_command(self, spec: StepSpec) -> list[str]:
        """`mnnpipe run STEP --spec-json ...` (mnnpipe.container), writing the Result where the xcom sidecar reads it."""
        return step_command(self.step, spec.model_dump_json(), result_path=POD_RESULT_PATH, use_cache=self.use_cache)

    def build_pod_operator(self, spec: StepSpec | None = None):
        """The pod operator that runs this step in the step image (not added to any DAG), with the
        same pod as `mnnpipe.airflow.pod` renders (restricted security, pinned sidecar, deadline).

        Its pod can be rendered without a cluster: `.build_pod_request_obj(context=None)`.
        It runs synchronously inside this task and holds a worker slot for the pod's lifetime; the
        bundled DAGs use the deferrable `mnnpipe.airflow.pod.pod_operator_class(step)` instead.
        """
        from .pod import pod_operator_class

        spec = spec if spec is not None else self.validated_spec()
        kwargs = dict(self.kubernetes_kwargs)
        op = pod_operator_class(self.step)(
            task_id=self.task_id,
            spec=spec,
            use_cache=self.use_cache,
            image=self.image,
            namespace=self.namespace,
            env_vars=self.env_vars,
            secret_env_from=self.secret_env_from,
            container_resources=self.container_resources,
            deferrable=False,
            # Executed from this operator's execute(): Airflow 3.3 allows it and logs a warning.
            allow_nested_operators=True,
            **kwargs,
        )
        op.prepare()
        return op


# ---------------------------------------------------------------------- one class per step


def operator_class_name(step: str) -> str:
    return f"Mnn{step.capitalize()}Operator"


_CLASSES: dict[str, type[MnnStepOperator]] = {}


def operator_class(step: str) -> type[MnnStepOperator]:
    """The operator class of `step`, built once from its Spec (docstring lists the Spec's fields)."""
    if step not in _CLASSES:
        spec_cls = step_module(step).Spec
        name = operator_class_name(step)
        fields = "\n".join(
            f"    - ``{field}``: {info.description or ''}" for field, info in spec_cls.model_fields.items() if field not in ("kind", "schema_version")
        )
        doc = f"Run the mnnpipe `{step}` step. {(spec_cls.__doc__ or '').strip()}\n\n``spec`` fields:\n\n{fields}\n"
        cls = type(name, (MnnStepOperator,), {"step": step, "__doc__": doc, "__module__": __name__, "__qualname__": name})
        _CLASSES[step] = cls
    return _CLASSES[step]


_BY_NAME = {operator_class_name(step): step for step in STEP_NAMES}
__all__ = ["MnnStepOperator", "operator_class", *_BY_NAME]


def __getattr__(name: str) -> type[MnnStepOperator]:
    # Classes are made on first use, so importing this module does not import every step.
    if name in _BY_NAME:
        cls = operator_class(_BY_NAME[name])
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_BY_NAME))
