"""Resolve the newest model version when a run starts: the first task of a scheduled pipeline.

A recurring run's parameters are fixed when the schedule is created, so a nightly that named a
`model_uri` would compress that one version forever. Built with `model_registry`, the pipeline
starts with this task instead: it lists `{model_registry}/{version}/model.<ext>` at run time and
hands the newest version's `model_uri`, `model_name` and `model_version` to the steps (and to
their output and release prefixes). Container form: `mnnpipe kfp-launch latest-version` in the
step image; lightweight form for kfp.local. This module imports kfp only inside the factory.
"""

from pathlib import Path
from typing import Any

from ..errors import InputError, SpecError
from ..registry import list_versions
from ..specs import check_uri

LATEST = "latest-version"
OUTPUTS = ("model_uri", "model_name", "model_version")


def resolve(model_registry: str) -> dict[str, str]:
    """{model_uri, model_name, model_version} of the newest version under `model_registry`."""
    try:
        check_uri(model_registry, "model_registry")
    except ValueError as e:
        raise SpecError(str(e)) from None
    versions = list_versions(model_registry)
    if not versions:
        raise InputError(f"model_registry: no model version under {model_registry} (expected {model_registry.rstrip('/')}/<version>/model.<ext>)")
    newest = versions[-1]
    return {"model_uri": newest.model_uri, "model_name": newest.name, "model_version": newest.version}


def resolve_into(model_registry: str, paths: dict[str, str]) -> dict[str, str]:
    """Resolve, then write each output parameter to the file KFP reads it from."""
    values = resolve(model_registry)
    for name, path in paths.items():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(values[name])
    print(f"newest model version under {model_registry}: {values['model_version']} ({values['model_uri']})")
    return values


def make_latest_component(form: str, image: str) -> Any:
    """The resolver task's component: container form for clusters, lightweight for kfp.local."""
    from kfp import dsl

    if form == "container":

        def latest_version(model_registry: str, model_uri: dsl.OutputPath(str), model_name: dsl.OutputPath(str), model_version: dsl.OutputPath(str)):
            """Resolve the newest model version under model_registry when the run starts."""
            return dsl.ContainerSpec(image=image, command=["mnnpipe", "kfp-launch"], args=[LATEST, "--executor-input", "{{$}}"])

        return dsl.container_component(latest_version)

    def latest_version(model_registry: str, model_uri: dsl.OutputPath(str), model_name: dsl.OutputPath(str), model_version: dsl.OutputPath(str)):
        """Resolve the newest model version under model_registry when the run starts."""
        from mnnpipe.kfp.latest import resolve_into

        resolve_into(model_registry, {"model_uri": model_uri, "model_name": model_name, "model_version": model_version})

    return dsl.component(latest_version, base_image=image, install_kfp_package=False)
