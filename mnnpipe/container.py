"""The step image and the command that runs a step in it, shared by the orchestrator adapters.

KFP container components and Airflow's KubernetesPodOperator both start `default_image()`
(entrypoint `mnnpipe`). Airflow pods run `step_command(...)` (`mnnpipe run STEP --spec-json`);
KFP components run `mnnpipe kfp-launch`, which maps KFP's artifacts into the same spec and
calls the same `runner.run_step`.
"""

from __future__ import annotations

import os

from . import __version__

IMAGE_ENV = "MNNPIPE_IMAGE"
# The tag follows the package version (containers/build.sh builds exactly this name).
DEFAULT_IMAGE = f"localhost/mnnpipe-step:{__version__}"


def default_image() -> str:
    """The step image: $MNNPIPE_IMAGE when set (a registry path in production), else DEFAULT_IMAGE."""
    return os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE


def resolve_image(image: str | None = None) -> str:
    """The one image setting every component, pipeline, schedule and pod uses: the `image`
    argument when given, else $MNNPIPE_IMAGE, else DEFAULT_IMAGE (read when called, not at import)."""
    return image or default_image()


def image_note(image: str) -> str:
    """How a release pins the step image; written into compiled pipelines and components."""
    return (
        f"Step image: {image}. A release pins it by tag and digest, e.g. "
        f"MNNPIPE_IMAGE=registry.example.com/mnnpipe-step:{__version__}@sha256:<digest> "
        "(or image=... / --image) when compiling, scheduling or starting runs."
    )


def step_command(step: str, spec_json: str, *, result_path: str | None = None, use_cache: bool = True) -> list[str]:
    """The container command that runs one step from its spec as a JSON string.

    `result_path`: also write the Result JSON to this file inside the container (where the
    orchestrator collects it: KFP's output file, Airflow's /airflow/xcom/return.json).
    `use_cache=False`: recompute even when an identical earlier run's output exists.
    """
    command = ["mnnpipe", "run", step, "--spec-json", spec_json]
    if result_path:
        command += ["--result", result_path]
    if not use_cache:
        command.append("--no-cache")
    return command
