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

from ..container import DEFAULT_IMAGE
from .gate import CANDIDATE, CANDIDATE_METRICS, GATE, REFERENCE_METRICS, GateSpec
from .interface import ENVELOPE_FIELDS, OUTPUT_METRICS, OUTPUT_MODEL, OUTPUT_REPORT, StepInterface, step_interface

Form = Literal["container", "lightweight"]


@dataclass(frozen=True)
class ComponentInterface:
    """Inputs and outputs of one generated component."""

    name: str  # step name, or "gate"
    summary: str
    spec_doc: str  # one line per user-facing spec field
    model_inputs: tuple[str, ...]
    metrics_inputs: tuple[str, ...]
    dataset_inputs: tuple[str, ...]
    outputs: tuple[str, ...]

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
    if name == GATE:
        return ComponentInterface(
            name=GATE,
            summary=GateSpec.__doc__.strip(),
            spec_doc=_field_lines(GateSpec, ENVELOPE_FIELDS),
            model_inputs=(CANDIDATE,),
            metrics_inputs=(CANDIDATE_METRICS, REFERENCE_METRICS),
            dataset_inputs=(),
            outputs=(OUTPUT_MODEL, OUTPUT_METRICS, OUTPUT_REPORT),
        )
    iface: StepInterface = step_interface(name)
    outputs = ((OUTPUT_MODEL,) if iface.produces_model else ()) + (OUTPUT_METRICS, OUTPUT_REPORT)
    return ComponentInterface(
        name=name,
        summary=iface.summary,
        spec_doc=_field_lines(iface.spec_cls, ENVELOPE_FIELDS),
        model_inputs=iface.model_inputs,
        metrics_inputs=(),
        dataset_inputs=iface.dataset_inputs,
        outputs=outputs,
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
    params += [f"{f}: Input[Metrics] = None" for f in ci.metrics_inputs]
    params += [f"{f}: Input[Dataset] = None" for f in ci.dataset_inputs]
    params += [f'{f}_uri: str = ""' for f in ci.uri_inputs]
    params.append('output_uri: str = ""')
    args = [
        f"spec: The {ci.name} spec as a JSON object, validated (pydantic) before anything runs; the URIs of connected "
        "inputs and `output` are filled in by the launcher. See the component description for its fields."
    ]
    args += [f"{o}: {_OUTPUT_DOCS[o]}" for o in ci.outputs]
    args += [f"{f}: Model for spec field `{f}` (its uri comes from the artifact)." for f in ci.model_inputs]
    args += [f"{f}: Metrics artifact whose values the gate reads." for f in ci.metrics_inputs]
    args += [f"{f}: Dataset for spec field `{f}` (its uri comes from the artifact)." for f in ci.dataset_inputs]
    args += [f"{f}_uri: URI for spec field `{f}` when no artifact is connected (e.g. a pipeline parameter)." for f in ci.uri_inputs]
    args.append("output_uri: Prefix (s3:// or path) the step publishes to; overrides the spec's `output`.")
    doc = "\n".join(
        [
            f"mnnpipe {ci.name}: {ci.summary}",
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
        artifacts = ", ".join(f"{f!r}: {f}" for f in ci.model_inputs + ci.metrics_inputs + ci.dataset_inputs)
        uris = ", ".join(f"{f!r}: {f}_uri" for f in ci.uri_inputs)
        outputs = ", ".join(f"{o!r}: {o}" for o in ci.outputs)
        body = (
            "from mnnpipe.kfp.launcher import launch_lightweight\n"
            f"launch_lightweight({ci.name!r}, spec, {{{artifacts}}}, {{{uris}}}, output_uri, {{{outputs}}})"
        )
    signature = ",\n".join(f"    {p}" for p in params)
    return f'def {ci.function_name}(\n{signature},\n):\n    """{doc}\n    """\n{textwrap.indent(body, "    ")}\n'


def _compile_function(source: str, name: str, key: str) -> Any:
    """Exec generated source under a registered file name, so inspect.getsource (kfp) finds it."""
    from kfp import dsl
    from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

    filename = f"<mnnpipe-kfp-{key}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict[str, Any] = {
        "dsl": dsl, "Input": Input, "Output": Output, "Model": Model, "Metrics": Metrics, "Markdown": Markdown, "Dataset": Dataset,
    }
    exec(compile(source, filename, "exec", dont_inherit=True), namespace)  # no PEP 563 strings: kfp reads the types
    return namespace[name]


@lru_cache(maxsize=None)
def make_component(name: str, form: Form = "container", image: str = DEFAULT_IMAGE) -> Any:
    """The KFP component for a step (or 'gate'): container form for clusters, lightweight for kfp.local."""
    from kfp import dsl

    ci = component_interface(name)
    source = function_source(ci, form, image)
    func = _compile_function(source, ci.function_name, f"{form}-{name}-{abs(hash(image))}")
    if form == "container":
        return dsl.container_component(func)
    # install_kfp_package=False: the host (or the step image) already has mnnpipe and kfp.
    return dsl.component(func, base_image=image, install_kfp_package=False)


def component_yaml(name: str, image: str = DEFAULT_IMAGE) -> str:
    """The reusable component.yaml text for a step's container component (deterministic)."""
    import tempfile
    from pathlib import Path

    from kfp import compiler

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "component.yaml"
        compiler.Compiler().compile(make_component(name, "container", image), str(path))
        return path.read_text()
