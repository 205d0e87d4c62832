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
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from airflow.sdk import BaseOperator

from ..container import resolve_image, step_command
from ..errors import InputError, SpecError
from ..specs import StepSpec
from .. import catalog
from .common import (  # noqa: F401  (spec_dict, has_templates...: public here too)
    DEFAULT_RESOURCES,
    POD_RESULT_PATH,
    PULL_POLICIES,
    _check_env,
    _check_resources,
    has_templates,
    operator_class_name,
    spec_dict,
    summary_line,
)

if TYPE_CHECKING:
    from airflow.sdk import Context

Execution = Literal["in_process", "kubernetes"]
EXECUTIONS: tuple[str, ...] = ("in_process", "kubernetes")
KUBERNETES_EXTRA_MISSING = (
    "execution 'kubernetes' needs apache-airflow-providers-cncf-kubernetes (pip install 'mnnpipe[k8s]'); "
    "use execution='in_process' to run the step in the worker"
)

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
                result = catalog.get(self.step).result.model_validate(raw)
        except (SpecError, InputError) as e:
            # A wrong spec or a missing input stays wrong on every retry.
            raise AirflowFailException(f"{self.step}: {e}") from e
        self.log.info("%s published %d artifact(s) to %s (cached: %s)", self.step, len(result.artifacts), result.output, result.cached)
        if self.execution == "in_process":  # the pod operator has logged the summary line itself
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


def _document(cls: type[MnnStepOperator]) -> None:
    """The class docstring from the step's Spec (its summary and every field's description)."""
    spec_cls = catalog.get(cls.step).spec
    fields = "\n".join(
        f"    - ``{field}``: {info.description or ''}" for field, info in spec_cls.model_fields.items() if field not in ("kind", "schema_version")
    )
    cls.__doc__ = f"Run the mnnpipe `{cls.step}` step. {(spec_cls.__doc__ or '').strip()}\n\n``spec`` fields:\n\n{fields}\n"


class MnnDistillOperator(MnnStepOperator):
    step = "distill"


class MnnPruneOperator(MnnStepOperator):
    step = "prune"


class MnnQuantizeOperator(MnnStepOperator):
    step = "quantize"


class MnnConvertOperator(MnnStepOperator):
    step = "convert"


class MnnBenchmarkOperator(MnnStepOperator):
    step = "benchmark"


class MnnGateOperator(MnnStepOperator):
    step = "gate"


class MnnSelectOperator(MnnStepOperator):
    step = "select"


class MnnTrendOperator(MnnStepOperator):
    step = "trend"


#: The bundled steps' classes are written out above so that type checkers and IDEs see them; a
#: step registered elsewhere (a team's own) gets an equivalent class made on first use.
_CLASSES: dict[str, type[MnnStepOperator]] = {
    cls.step: cls
    for cls in (
        MnnDistillOperator, MnnPruneOperator, MnnQuantizeOperator, MnnConvertOperator, MnnBenchmarkOperator, MnnGateOperator,
        MnnSelectOperator, MnnTrendOperator,
    )
}  # fmt: skip
for _cls in _CLASSES.values():
    _document(_cls)

__all__ = ["MnnStepOperator", "operator_class", *(operator_class_name(step) for step in _CLASSES)]


def operator_class(step: str) -> type[MnnStepOperator]:
    """The operator class of `step` (its docstring lists the Spec's fields)."""
    catalog.get(step)  # an unknown step is a SpecError naming the steps there are
    if step not in _CLASSES:
        name = operator_class_name(step)
        cls = type(name, (MnnStepOperator,), {"step": step, "__module__": __name__, "__qualname__": name})
        _document(cls)
        _CLASSES[step] = cls
    return _CLASSES[step]


def __getattr__(name: str) -> type[MnnStepOperator]:
    """`from mnnpipe.airflow.operators import Mnn<Step>Operator` for a step registered outside the
    package (e.g. through MNNPIPE_STEP_MODULES), as for the bundled ones."""
    for step in catalog.names():
        if operator_class_name(step) == name:
            return operator_class(step)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
