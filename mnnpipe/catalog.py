"""The step catalog: every step registers itself here, with what the adapters need to know.

A step module ends with one `register(...)` call naming its Spec, Result and run function and
declaring its roles: which model input the previous step feeds, which artifact it hands on (and
in what format), where it stands in a recipe. The CLI, the JSON schema, the KFP components, the
Airflow operators and the recipe all iterate this catalog; nothing lists the steps by hand.

Registration is a call at the end of the module rather than a hook on the Spec class because
the run function is defined after the Spec: only at the end can one call see all three and
refuse an incomplete step at import time.

Steps are found by importing every module of `mnnpipe.steps` (cheap: a step imports torch and
MNN only when it runs), then any module listed in $MNNPIPE_STEP_MODULES (comma-separated; a
team's own steps, or a test's), then anything already registered by an import.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal

from .errors import SpecError
from .specs import StepResult, StepSpec

#: Formats a step can hand on, and the file extension the artifact carries.
HandOffFormat = Literal["torchscript", "torch-export", "state-dict", "onnx", "mnn"]
EXTENSIONS: dict[str, str] = {"torchscript": ".pt", "torch-export": ".pt2", "state-dict": ".pth", "onnx": ".onnx", "mnn": ".mnn"}

#: Where a step stands in a run. Convert precedes quantize because MNN's int8 quantizer reads
#: the fp32 .mnn only the converter makes; measuring comes after every model step; a search
#: selects among measured candidates; the release gate ends every recipe; reports come last.
Stage = Literal["train", "shrink", "convert", "quantize", "measure", "select", "release", "report"]
STAGES: tuple[str, ...] = typing.get_args(Stage)
#: The stages a recipe is made of (one section per step of these stages, then the release).
RECIPE_STAGES: tuple[str, ...] = ("train", "shrink", "convert", "quantize", "measure")

ENV_MODULES = "MNNPIPE_STEP_MODULES"


@dataclass(frozen=True)
class HandOff:
    """The artifact a step hands to the next one: a path under its output, and its format."""

    artifact: str
    format: HandOffFormat

    def __post_init__(self) -> None:
        if not self.artifact.endswith(EXTENSIONS[self.format]):
            raise TypeError(f"hand-off {self.artifact} does not end with {EXTENSIONS[self.format]} ({self.format})")


@dataclass(frozen=True)
class StepDef:
    """One registered step. `run(spec, ctx) -> Result` is pure apart from files under ctx."""

    name: str
    spec: type[StepSpec]
    result: type[StepResult]
    run: Callable[[Any, Any], StepResult]
    stage: Stage
    #: The model input the previous step feeds (a field of Spec holding a ModelRef, or a list of
    #: items holding one, which the hand-off is appended to); None: the step reads no model.
    model_input: str | None
    #: What the step hands on; None for steps that only measure or release.
    hands_on: HandOff | None = None
    #: False when a result names its own location (never served from another run's cache).
    cacheable: bool = True
    #: Called by the runner once the output is published (under the output lock).
    after_publish: Callable[[Any, Any], StepResult] | None = None
    #: True for steps a recipe may leave out.
    optional: bool = True

    @property
    def summary(self) -> str:
        """The first paragraph of the Spec's docstring, on one line."""
        doc = inspect.getdoc(self.spec) or f"The {self.name} step."
        return doc.strip().split("\n\n")[0].replace("\n", " ")

    @property
    def module(self) -> str:
        return self.run.__module__


_STEPS: dict[str, StepDef] = {}
_discovered = False


def register(
    *,
    name: str,
    spec: type[StepSpec],
    result: type[StepResult],
    run: Callable[[Any, Any], StepResult],
    stage: Stage,
    model_input: str | None,
    hands_on: HandOff | None = None,
    cacheable: bool = True,
    after_publish: Callable[[Any, Any], StepResult] | None = None,
    optional: bool = True,
) -> StepDef:
    """Add a step to the catalog; a step with incomplete or inconsistent metadata is a TypeError
    at import time (a programming error, not a user's)."""
    if not name or not name.replace("_", "a").isalnum() or not name[0].isalpha() or name != name.lower():
        raise TypeError(f"step name {name!r} must be a lowercase identifier")
    if not (isinstance(spec, type) and issubclass(spec, StepSpec)) or not (isinstance(result, type) and issubclass(result, StepResult)):
        raise TypeError(f"step {name}: spec must subclass StepSpec and result StepResult")
    if not callable(run):
        raise TypeError(f"step {name}: run must be callable")
    if stage not in STAGES:
        raise TypeError(f"step {name}: stage {stage!r} is not one of {STAGES}")
    kind = spec.model_fields.get("kind")
    if kind is None or kind.default != name:
        raise TypeError(f"step {name}: Spec.kind must be Literal['{name}'] with default '{name}'")
    if model_input is not None and model_input not in spec.model_fields:
        raise TypeError(f"step {name}: model_input {model_input!r} is not a field of its Spec")
    if hands_on is not None and not isinstance(hands_on, HandOff):
        raise TypeError(f"step {name}: hands_on must be a HandOff")
    existing = _STEPS.get(name)
    if existing is not None and existing.module != run.__module__:
        raise TypeError(f"step {name} is registered twice ({existing.module} and {run.__module__})")
    step = StepDef(
        name=name, spec=spec, result=result, run=run, stage=stage, model_input=model_input,
        hands_on=hands_on, cacheable=cacheable, after_publish=after_publish, optional=optional,
    )  # fmt: skip
    _STEPS[name] = step
    return step


def class_name(name: str) -> str:
    """A step name as it reads in class names: 'select' -> 'Select', 'my_step' -> 'MyStep'."""
    return "".join(part.capitalize() for part in name.split("_"))


def unregister(name: str) -> None:
    """Remove a step (tests that register a step of their own clean up with this)."""
    _STEPS.pop(name, None)


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    # By name: the catalog sits below the steps in the layers and imports none of them itself.
    package = importlib.import_module(f"{__package__}.steps")
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")
    for module in filter(None, (m.strip() for m in os.environ.get(ENV_MODULES, "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise SpecError(f"{ENV_MODULES}: cannot import step module '{module}' ({e})") from None


def names() -> tuple[str, ...]:
    """Every registered step, in recipe order (stage, then name)."""
    _discover()
    return tuple(sorted(_STEPS, key=lambda n: (STAGES.index(_STEPS[n].stage), n)))


def steps() -> tuple[StepDef, ...]:
    return tuple(_STEPS[n] for n in names())


def get(name: str) -> StepDef:
    """The step called `name`; SpecError (exit 2) naming the steps there are when unknown."""
    if name not in _STEPS:
        _discover()
    if name not in _STEPS:
        raise SpecError(f"unknown step '{name}'; expected one of {', '.join(names())}")
    return _STEPS[name]
