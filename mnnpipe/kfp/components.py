"""KFP components generated from step Specs: container components for clusters, lightweight
(Python) components with the same interface for `kfp.local` runs.

Both forms run the same launcher (`mnnpipe.kfp.launcher`): the container component as
``mnnpipe kfp-launch STEP --executor-input '{{$}}'`` in the step image, the lightweight one by
calling `launch_lightweight` in the host's Python (kfp.local's SubprocessRunner runs only
lightweight components). The function signature KFP reads is generated as source text from the
step's interface, so no step parameter is declared here.
"""

from __future__ import annotations

import linecache
import textwrap
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from ..container import image_note, resolve_image
from .interface import ENVELOPE_FIELDS, OUTPUT_METRICS, OUTPUT_MODEL, OUTPUT_REPORT, StepInterface, setting_fields, step_interface

Form = Literal["container", "lightweight"]


@dataclass(frozen=True)
class ComponentInterface:
    """Inputs and outputs of one generated component."""

    name: str  # step name
    summary: str
    spec_doc: str  # one line per user-facing spec field
    model_inputs: tuple[str, ...]
    metrics_inputs: tuple[str, ...]
    dataset_inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    #: per-item Model inputs of a model list: (input name, list field, item index)
    item_inputs: tuple[tuple[str, str, int], ...] = ()
    #: typed parameters beside `spec`: (spec field, KFP type)
    settings: tuple[tuple[str, str], ...] = ()
    #: fan-in inputs: (input name, list field, item field, "model" | "metrics")
    collected_inputs: tuple[tuple[str, str, str, str], ...] = ()

    @property
    def uri_inputs(self) -> tuple[str, ...]:
        return tuple(f for f in self.model_inputs + self.dataset_inputs)

    @property
    def function_name(self) -> str:
        return f"mnnpipe_{self.name}"


def _field_lines(spec_cls: type, skip: tuple[str, ...]) -> str:
    lines = []
    for name, info in spec_cls.model_fields.items():
        if name in skip:
            continue
        required = "required" if info.is_required() else "optional"
        desc = (info.description or "").replace("\n", " ")
        lines.append(f"- {name} ({required}): {desc}")
    return "\n".join(lines)


def component_interface(name: str) -> ComponentInterface:
    iface: StepInterface = step_interface(name)
    outputs = ((OUTPUT_MODEL,) if iface.produces_model else ()) + (OUTPUT_METRICS, OUTPUT_REPORT)
    return ComponentInterface(
        name=name,
        summary=iface.summary,
        spec_doc=_field_lines(iface.spec_cls, ENVELOPE_FIELDS),
        model_inputs=iface.model_inputs,
        metrics_inputs=iface.metrics_inputs,
        dataset_inputs=iface.dataset_inputs,
        outputs=outputs,
        item_inputs=tuple((name, field, index) for name, field, index, _ in iface.item_inputs),
        settings=setting_fields(iface.spec_cls),
        collected_inputs=iface.collected_inputs,
    )


_OUTPUT_TYPES = {OUTPUT_MODEL: "Model", OUTPUT_METRICS: "Metrics", OUTPUT_REPORT: "Markdown"}
_OUTPUT_DOCS = {
    OUTPUT_MODEL: "The model the step published (a copy; metadata.mnnpipe_uri is its URI in the step store).",
    OUTPUT_METRICS: "Every metric the step measured.",
    OUTPUT_REPORT: "Markdown summary: metrics and published artifacts with sizes and sha256.",
}


def function_source(ci: ComponentInterface, form: Form, image: str) -> str:
    """The Python source of the component function KFP compiles (signature + docstring + body)."""
    params = ["spec: str"]
    params += [f"{o}: Output[{_OUTPUT_TYPES[o]}]" for o in ci.outputs]
    params += [f"{f}: Input[Model] = None" for f in ci.model_inputs]
    params += [f"{f}: Input[Model] = None" for f, _, _ in ci.item_inputs]
    params += [f"{f}: Input[Metrics] = None" for f in ci.metrics_inputs]
    params += [f"{f}: Input[Dataset] = None" for f in ci.dataset_inputs]
    params += [f"{f}: Input[List[{'Model' if kind == 'model' else 'Metrics'}]] = None" for f, _, _, kind in ci.collected_inputs]
    params += [f'{f}_uri: str = ""' for f in ci.uri_inputs]
    params.append('output_uri: str = ""')
    params.append('output_subpath: str = ""')
    # kfp.local 2.17 casts every integer parameter with int(), an unset optional one (None)
    # included, and fails: its lightweight twin takes integer settings as float (4 -> 4.0, which
    # the spec's int field accepts back as 4). Clusters leave unset parameters out.
    params += [f"{f}: {'float' if kind == 'int' and form == 'lightweight' else kind} = None" for f, kind in ci.settings]
    args = [
        f"spec: The {ci.name} spec as a JSON object, validated (pydantic) before anything runs; the URIs of connected "
        "inputs and `output` are filled in by the launcher. See the component description for its fields."
    ]
    args += [f"{o}: {_OUTPUT_DOCS[o]}" for o in ci.outputs]
    args += [f"{f}: Model for spec field `{f}` (its uri comes from the artifact)." for f in ci.model_inputs]
    args += [f"{f}: Model for item {i} of spec field `{field}` (wire several models side by side)." for f, field, i in ci.item_inputs]
    args += [f"{f}: Metrics artifact whose values fill spec field `{f}`." for f in ci.metrics_inputs]
    args += [f"{f}: Dataset for spec field `{f}` (its uri comes from the artifact)." for f in ci.dataset_inputs]
    args += [
        f"{f}: {kind.capitalize()} artifacts (e.g. dsl.Collected over a ParallelFor): artifact i fills `{sub}` of item i of spec field `{field}`."
        for f, field, sub, kind in ci.collected_inputs
    ]
    args += [f"{f}_uri: URI for spec field `{f}` when no artifact is connected (e.g. a pipeline parameter)." for f in ci.uri_inputs]
    args.append("output_uri: Prefix (s3:// or path) the step publishes to; overrides the spec's `output`.")
    args.append("output_subpath: Appended to output_uri (e.g. a ParallelFor item's `<candidate>/<step>`).")
    args += [f"{f}: Sets spec field `{f}` (overrides the JSON spec; unset keeps it)." for f, _ in ci.settings]
    doc = "\n".join(
        [
            f"mnnpipe {ci.name}: {ci.summary}",
            "",
            image_note(image),
            "",
            f"Spec fields (`mnnpipe schema {ci.name}` prints the JSON Schema):",
            "",
            ci.spec_doc,
            "",
            "Args:",
            *[f"    {a}" for a in args],
        ]
    )
    if form == "container":
        body = (
            f"return dsl.ContainerSpec(image={image!r}, command=['mnnpipe', 'kfp-launch'], "
            f"args=[{ci.name!r}, '--executor-input', '{{{{$}}}}'])"
        )
    else:
        artifacts = ", ".join(
            f"{f!r}: {f}"
            for f in ci.model_inputs + tuple(f for f, _, _ in ci.item_inputs) + ci.metrics_inputs + ci.dataset_inputs + tuple(f for f, *_ in ci.collected_inputs)
        )
        uris = ", ".join(f"{f!r}: {f}_uri" for f in ci.uri_inputs)
        outputs = ", ".join(f"{o!r}: {o}" for o in ci.outputs)
        settings = ", ".join(f"{f!r}: {f}" for f, _ in ci.settings)
        body = (
            "from mnnpipe.kfp.launcher import launch_lightweight\n"
            f"launch_lightweight({ci.name!r}, spec, {{{artifacts}}}, {{{uris}}}, output_uri, {{{outputs}}}, {{{settings}}}, output_subpath)"
        )
    signature = ",\n".join(f"    {p}" for p in params)
    return f'def {ci.function_name}(\n{signature},\n):\n    """{doc}\n    """\n{textwrap.indent(body, "    ")}\n'


def _compile_function(source: str, name: str, key: str) -> Any:
    """Exec generated source under a registered file name, so inspect.getsource (kfp) finds it."""
    from kfp import dsl
    from typing import List

    from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

    filename = f"<mnnpipe-kfp-{key}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict[str, Any] = {
        "dsl": dsl, "Input": Input, "Output": Output, "Model": Model, "Metrics": Metrics, "Markdown": Markdown, "Dataset": Dataset,
        "List": List,
    }
    exec(compile(source, filename, "exec", dont_inherit=True), namespace)  # no PEP 563 strings: kfp reads the types
    return namespace[name]


def make_component(name: str, form: Form = "container", image: str | None = None) -> Any:
    """The KFP component for a step: container form for clusters, lightweight for kfp.local.

    `image`: the step image; None takes $MNNPIPE_IMAGE, else the package's default tag.
    """
    return _make_component(name, form, resolve_image(image))


@lru_cache(maxsize=None)
def _make_component(name: str, form: Form, image: str) -> Any:
    from kfp import dsl

    ci = component_interface(name)
    source = function_source(ci, form, image)
    func = _compile_function(source, ci.function_name, f"{form}-{name}-{abs(hash(image))}")
    if form == "container":
        return dsl.container_component(func)
    # install_kfp_package=False: the host (or the step image) already has mnnpipe and kfp.
    return dsl.component(func, base_image=image, install_kfp_package=False)


def component_yaml(name: str, image: str | None = None) -> str:
    """The reusable component.yaml text for a step's container component (deterministic)."""
    import tempfile
    from pathlib import Path

    from kfp import compiler

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "component.yaml"
        compiler.Compiler().compile(make_component(name, "container", image), str(path))
        text = path.read_text()
    # Caching off in the shipped file too (a component submitted on its own): kfp 2.17 wraps a
    # component in a one-task pipeline with caching on and no switch, so write what it writes for off.
    cached = "        cachingOptions:\n          enableCache: true\n"
    if text.count(cached) != 1:
        raise AssertionError(f"component.yaml of {name}: expected one cachingOptions block, kfp's layout changed")
    return text.replace(cached, "        cachingOptions: {}\n")


# --------------------------------------------------------------------------- the importable API
#
#     from mnnpipe.kfp import components
#
#     @dsl.pipeline
#     def my_pipeline(model_uri: str):
#         trained = my_training_component(...)
#         converted = components.convert(spec=json.dumps({...}), model=trained.outputs["model"])
#         components.use_s3(converted, secret_name="mnnpipe-s3", endpoint_url="http://minio:9000")
#
# One loader for cluster and local runs: under `kfp.local.init(runner=SubprocessRunner())` the
# lightweight twin runs (kfp.local runs only those), otherwise the container component does.

#: Requests, limits and retries every task gets unless the caller sets others afterwards.
TASK_DEFAULTS: dict[str, Any] = {
    "cpu_request": "1",
    "cpu_limit": "2",
    "memory_request": "2G",
    "memory_limit": "4G",
    "retries": 2,  # a store or node hiccup; a bad spec (exit 2) fails the same way each time
    "retry_backoff": "60s",
}


def current_form() -> Form:
    """'lightweight' inside a `kfp.local` session with the SubprocessRunner, else 'container'."""
    try:
        from kfp.local.config import LocalExecutionConfig, SubprocessRunner
    except ImportError:
        return "container"
    instance = LocalExecutionConfig.instance
    return "lightweight" if instance is not None and isinstance(instance.runner, SubprocessRunner) else "container"


def with_task_defaults(task: Any) -> Any:
    """Caching off (mnnpipe's own cache is keyed on content, KFP's on parameter strings), the
    CPU/memory requests and limits and the retry policy of TASK_DEFAULTS. Returns `task`."""
    d = TASK_DEFAULTS
    task.set_caching_options(False)
    task.set_cpu_request(d["cpu_request"]).set_cpu_limit(d["cpu_limit"])
    task.set_memory_request(d["memory_request"]).set_memory_limit(d["memory_limit"])
    task.set_retry(num_retries=d["retries"], backoff_duration=d["retry_backoff"], backoff_factor=2.0)
    return task


def load(name: str, image: str | None = None) -> Any:
    """The component of step `name` in the form this run needs (see `current_form`)."""
    return make_component(name, current_form(), image)


def task(name: str, *, image: str | None = None, **inputs: Any) -> Any:
    """A task of step `name` in the current pipeline, with TASK_DEFAULTS applied."""
    form = current_form()
    if form == "lightweight":  # integer settings are float parameters there (see function_source)
        ints = {f for f, kind in component_interface(name).settings if kind == "int"}
        inputs = {k: float(v) if k in ints and isinstance(v, int) and not isinstance(v, bool) else v for k, v in inputs.items()}
    return with_task_defaults(make_component(name, form, image)(**inputs)).set_display_name(name)


def use_s3(task: Any, *, secret_name: str | None = "mnnpipe-s3", endpoint_url: str = "", region: str = "") -> Any:
    """Give `task` the step store's S3 settings: credentials from the Kubernetes Secret
    `secret_name` (keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; through kfp-kubernetes, so only
    the name is in the pipeline), the endpoint and region as plain variables. `secret_name=None`
    for IRSA / workload identity. Returns `task`."""
    if secret_name:
        from kfp import kubernetes

        keys = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
        kubernetes.use_secret_as_env(task, secret_name=secret_name, secret_key_to_env=keys)
    if endpoint_url:
        task.set_env_variable("MNNPIPE_S3_ENDPOINT_URL", endpoint_url)
    if region:
        task.set_env_variable("AWS_DEFAULT_REGION", region)
    return task


def _step_function(name: str) -> Any:
    def run(*, image: str | None = None, **inputs: Any) -> Any:
        return task(name, image=image, **inputs)

    ci = component_interface(name)
    run.__name__ = run.__qualname__ = name
    run.__doc__ = f"A `{name}` task ({ci.summary}) with TASK_DEFAULTS; inputs as in components/{name}/README.md."
    return run


def _public_names() -> list[str]:
    from .. import catalog

    return list(catalog.names())


# One function per component, made from the same list the generator writes component.yaml for.
for _name in _public_names():
    globals()[_name] = _step_function(_name)


def __getattr__(name: str) -> Any:
    """`components.<step>` for a step registered after this module was imported."""
    from .. import catalog

    if name in catalog.names():
        return _step_function(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
