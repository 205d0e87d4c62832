"""The steps. Each module defines `Spec`, `Result` and a pure `run(spec, ctx) -> Result`, and may
define `after_publish(spec, result) -> Result`, which the runner calls once the output is published,
and `CACHEABLE = False` when its result names its own location (never served from another run's).

Modules are imported only when their step runs, so `mnnpipe schema` or an Airflow scheduler
parsing a DAG does not pay for torch-heavy imports it does not need.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from ..errors import SpecError

STEP_NAMES = ("distill", "prune", "quantize", "convert", "benchmark", "gate")


def step_module(name: str) -> ModuleType:
    if name not in STEP_NAMES:
        raise SpecError(f"unknown step '{name}'; expected one of {', '.join(STEP_NAMES)}")
    return importlib.import_module(f"{__name__}.{name}")


def available_steps() -> list[str]:
    """Steps whose module is installed here (all of STEP_NAMES in a complete installation)."""
    return [name for name in STEP_NAMES if importlib.util.find_spec(f"{__name__}.{name}") is not None]
