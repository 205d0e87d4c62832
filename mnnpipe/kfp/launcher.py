"""The thin launcher KFP components run: map KFP artifacts and URI parameters into a step's spec,
validate it, run the step through `runner.run_step`, and hand the results back to KFP.

Two entry points share `launch`:

* container components run ``mnnpipe kfp-launch STEP --executor-input '{{$}}'``: KFP substitutes
  the executor input JSON; `main` reads artifacts and parameters from it and writes the executor
  output file KFP reads back (artifact metadata such as metrics). No kfp import: the step image
  does not ship kfp.
* lightweight components (for `kfp.local` runs) call `launch_lightweight` with kfp's own
  artifact objects.

How an input artifact becomes a ModelRef/DatasetRef URI: an artifact written by an upstream
mnnpipe component carries `mnnpipe_uri` in its metadata, the published URI in the step store
(with its file extension and manifest, so the format is inferred and the bytes verified); any
other artifact is used at the local path the KFP launcher downloaded it to.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError, SpecError
from ..specs import StepResult
from .interface import MODEL_EXTENSIONS, OUTPUT_METRICS, OUTPUT_MODEL, OUTPUT_REPORT, ArtifactRef, input_uri
from .latest import LATEST, resolve_into

log = logging.getLogger("mnnpipe.kfp")

#: Where KFP's launcher mounts/downloads remote artifacts inside a container (kfp's convention).
_LOCAL_MOUNTS = {"gs://": "/gcs/", "minio://": "/minio/", "s3://": "/s3/"}


def local_path_for(uri: str) -> str:
    """The local path KFP's launcher uses for an artifact URI (same rule as kfp.dsl.Artifact.path)."""
    for prefix, mount in _LOCAL_MOUNTS.items():
        if uri.startswith(prefix):
            return mount + uri[len(prefix) :]
    return uri


def bind_spec(
    spec_json: str | dict[str, Any],
    *,
    ref_fields: tuple[str, ...],
    artifacts: dict[str, ArtifactRef | None],
    uris: dict[str, str],
    output_uri: str = "",
    model_lists: tuple[tuple[str, str], ...] = (),
    item_inputs: tuple[tuple[str, str, int, str], ...] = (),
    metrics_inputs: tuple[str, ...] = (),
    collected_inputs: tuple[tuple[str, str, str, str], ...] = (),
) -> dict[str, Any]:
    """The spec dict with wired URIs filled in: an artifact wins over a `<field>_uri` parameter,
    which wins over the URI written in the spec. Other fields of a ref (format, factory,
    preprocess...) come from the spec; a format recorded by the producer fills a missing one.
    A per-item artifact (`models_item1`) sets that item's model; the list's own artifact then
    fills every item still without a uri. A connected Metrics artifact sets its metric-values field."""
    data = _spec_fields(spec_json)
    for name, field_name, sub, kind in collected_inputs:
        collected = artifacts.get(name)
        if not collected:
            continue
        items = [dict(i) if isinstance(i, dict) else i for i in data.get(field_name) or []]
        if len(collected) != len(items) or not all(isinstance(i, dict) for i in items):
            raise SpecError(f"{name}: {len(collected)} artifact(s) collected for spec.{field_name}, which lists {len(items)} item(s)")
        for item, artifact in zip(items, collected):
            item[sub] = _with_uri(item.get(sub), input_uri(artifact), artifact.metadata.get("format")) if kind == "model" else metric_values(artifact, name)
        data[field_name] = items
    for name, field_name, index, sub in item_inputs:
        artifact = artifacts.get(name)
        if artifact is None:
            continue
        items = [dict(i) if isinstance(i, dict) else i for i in data.get(field_name) or []]
        if index >= len(items) or not isinstance(items[index], dict):
            raise SpecError(f"{name}: an artifact is connected for item {index} of spec.{field_name}, which has {len(items)} item(s)")
        items[index][sub] = _with_uri(items[index].get(sub), input_uri(artifact), artifact.metadata.get("format"))
        data[field_name] = items
    for name in ref_fields:
        artifact = artifacts.get(name)
        uri = input_uri(artifact) if artifact is not None else uris.get(name, "")
        if not uri:
            continue
        fmt = artifact.metadata.get("format") if artifact is not None else None
        sub = dict(model_lists).get(name)
        if sub is not None:  # a list of items holding a model: fill every item that has no uri yet
            items = [dict(i) if isinstance(i, dict) else i for i in data.get(name) or []]
            for item in items:
                if isinstance(item, dict) and not (item.get(sub) or {}).get("uri"):
                    item[sub] = _with_uri(item.get(sub), uri, fmt)
            data[name] = items
        else:
            data[name] = _with_uri(data.get(name), uri, fmt)
    for name in metrics_inputs:
        artifact = artifacts.get(name)
        if artifact is not None:
            data[name] = metric_values(artifact, name)
    if output_uri:
        data["output"] = output_uri
    return data


def metric_values(artifact: ArtifactRef, label: str) -> dict[str, float]:
    """The numbers of a Metrics artifact: its metadata (kfp.local, lightweight components), else
    the JSON object in its file (written by a container component)."""
    values = {k: v for k, v in (artifact.metadata or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not values and artifact.path and Path(artifact.path).is_file():
        try:
            values = json.loads(Path(artifact.path).read_text())
        except ValueError:
            raise InputError(f"{label}: {artifact.path} is not a JSON object of metrics") from None
        if not isinstance(values, dict):
            raise InputError(f"{label}: {artifact.path} is not a JSON object of metrics")
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _with_uri(ref: Any, uri: str, fmt: str | None) -> dict[str, Any]:
    ref = dict(ref) if isinstance(ref, dict) else {}
    ref["uri"] = uri
    if fmt and "format" not in ref and "factory" not in ref:
        ref["format"] = fmt
    return ref


def primary_model(result: StepResult) -> tuple[str, Any] | None:
    """The step's output model: the published artifact with the most specific model extension."""
    for ext in MODEL_EXTENSIONS:
        names = sorted(n for n in result.artifacts if n.endswith(ext))
        if names:
            preferred = [n for n in names if Path(n).name.startswith("model")] or names
            return preferred[0], result.artifacts[preferred[0]]
    return None


def report_markdown(step: str, result: StepResult) -> str:
    """A Markdown summary for the KFP UI: metrics and published artifacts, all from the result."""
    lines = [f"# mnnpipe {step}", "", f"Output: `{result.output}`" + (" (cached)" if result.cached else ""), ""]
    if result.metrics:
        lines += ["| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in sorted(result.metrics.items())]
        lines.append("")
    lines += ["| artifact | bytes | sha256 |", "|---|---:|---|"]
    lines += [f"| `{name}` | {a.size} | `{a.sha256[:12]}` |" for name, a in sorted(result.artifacts.items())]
    return "\n".join(lines) + "\n"


def write_outputs(step: str, result: StepResult, paths: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Write the output artifacts' files; return each one's metadata (for KFP's metadata store)."""
    from ..store import fetch

    metadata: dict[str, dict[str, Any]] = {}
    if OUTPUT_MODEL in paths:
        found = primary_model(result)
        if found is None:
            raise SpecError(f"{step}: the step published no model file ({', '.join(MODEL_EXTENSIONS)})")
        name, art = found
        dest = Path(paths[OUTPUT_MODEL])
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="mnnpipe-kfp-") as tmp:
            shutil.copyfile(fetch(art.uri, Path(tmp)), dest)  # fetch verifies against the manifest
        metadata[OUTPUT_MODEL] = {
            "mnnpipe_uri": art.uri,
            "format": _format_of(name),
            "sha256": art.sha256,
            "size": art.size,
            "step": step,
            "cache_key": result.cache_key,
        }
    if OUTPUT_METRICS in paths:
        dest = Path(paths[OUTPUT_METRICS])
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(result.metrics, indent=2, sort_keys=True))
        metadata[OUTPUT_METRICS] = dict(result.metrics)
    if OUTPUT_REPORT in paths:
        dest = Path(paths[OUTPUT_REPORT])
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(report_markdown(step, result))
        metadata[OUTPUT_REPORT] = {"mnnpipe_output": result.output}
    return metadata


def _format_of(name: str) -> str:
    from ..specs import _EXT_FORMATS

    return _EXT_FORMATS.get(Path(name).suffix.lower(), "auto")


def launch(
    step: str,
    spec_json: str | dict[str, Any],
    *,
    artifacts: dict[str, ArtifactRef | None],
    uris: dict[str, str],
    output_uri: str,
    output_paths: dict[str, str],
    use_cache: bool = True,
) -> tuple[StepResult, dict[str, dict[str, Any]]]:
    """Bind, validate (SpecError before any work), run the step, write the output artifacts."""
    from ..runner import parse_spec, run_step
    from .interface import step_interface

    iface = step_interface(step)
    data = bind_spec(
        spec_json,
        ref_fields=iface.ref_inputs,
        artifacts=artifacts,
        uris=uris,
        output_uri=output_uri,
        model_lists=iface.model_lists,
        item_inputs=iface.item_inputs,
        metrics_inputs=iface.metrics_inputs,
        collected_inputs=iface.collected_inputs,
    )
    spec = parse_spec(step, data)
    result = run_step(step, spec, use_cache=use_cache, quiet=True)
    return result, write_outputs(step, result, output_paths)


# --------------------------------------------------------------------------- lightweight (kfp.local)


def _spec_fields(spec_json: str | dict[str, Any]) -> dict[str, Any]:
    """The spec parameter as a dict: JSON/YAML text (within the CLI's size/depth limits) or a dict."""
    if isinstance(spec_json, str):
        from ..spectext import load_yaml

        data = load_yaml(spec_json, "spec") if spec_json.strip() else {}
    else:
        data = dict(spec_json)
    if not isinstance(data, dict):
        raise SpecError(f"spec: expected a JSON object of spec fields, got {type(data).__name__}")
    return data


def with_settings(spec_json: str | dict[str, Any], settings: dict[str, Any]) -> str | dict[str, Any]:
    """The spec with the typed parameters that were set (not None) written over its fields."""
    given = {k: v for k, v in settings.items() if v is not None}
    if not given:
        return spec_json
    return {**_spec_fields(spec_json), **given}


def setting_names(step: str) -> set[str]:
    from .. import catalog
    from .interface import setting_fields

    return {name for name, _ in setting_fields(catalog.get(step).spec)}


def output_prefix(output_uri: str, subpath: str) -> str:
    """Where the step publishes: output_uri, with `subpath` appended (a ParallelFor item's
    `<candidate>/<step>`: kfp.local cannot interpolate a loop item into an f-string)."""
    if not subpath:
        return output_uri
    if not output_uri:
        raise SpecError("output_subpath: given without output_uri")
    parts = subpath.strip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise SpecError(f"output_subpath: expected relative path segments, got '{subpath}'")
    from ..store import join

    return join(output_uri, *parts)


def launch_lightweight(
    step: str, spec: str, artifacts: dict[str, Any], uris: dict[str, str], output_uri: str, outputs: dict[str, Any], settings: dict[str, Any] | None = None,
    output_subpath: str = "",
) -> str:
    """Called by generated lightweight components with kfp's artifact objects; returns result JSON."""
    spec = with_settings(spec, settings or {})
    def ref(a: Any) -> ArtifactRef:
        return ArtifactRef(uri=a.uri, path=a.path, metadata=dict(a.metadata or {}))

    refs = {name: ([ref(x) for x in a] if isinstance(a, list) else ref(a)) if a is not None else None for name, a in artifacts.items()}
    result, metadata = launch(
        step, spec, artifacts=refs, uris=uris, output_uri=output_prefix(output_uri, output_subpath),
        output_paths={n: a.path for n, a in outputs.items()},
    )
    for name, art in outputs.items():
        art.metadata.update(metadata.get(name, {}))
    return result.model_dump_json()


# --------------------------------------------------------------------------- container (executor input)


def _artifact_from_executor(entry: dict[str, Any]) -> ArtifactRef | None:
    items = _artifacts_from_executor(entry)
    return items[0] if items else None


def _artifacts_from_executor(entry: dict[str, Any]) -> list[ArtifactRef]:
    """Every artifact of one input (a list input, e.g. dsl.Collected, has several)."""
    return [
        ArtifactRef(uri=item.get("uri", ""), path=local_path_for(item.get("uri", "")), metadata=dict(item.get("metadata") or {}))
        for item in entry.get("artifacts") or []
    ]


def run_executor_input(step: str, executor_input: dict[str, Any], launch_fn: Callable[..., Any] = launch) -> dict[str, Any]:
    """Run a step from KFP's executor input; write and return the executor output."""
    inputs = executor_input.get("inputs", {})
    outputs = executor_input.get("outputs", {})
    params = inputs.get("parameterValues", {}) or {}
    if step == LATEST:  # not a step: the scheduled pipeline's resolver writes three output parameters
        paths = {name: entry["outputFile"] for name, entry in (outputs.get("parameters") or {}).items()}
        values = resolve_into(str(params.get("model_registry", "")), paths)
        return {"parameterValues": values}
    from .interface import step_interface

    collected = {name for name, *_ in step_interface(step).collected_inputs}
    artifacts = {
        name: _artifacts_from_executor(entry) if name in collected else _artifact_from_executor(entry)
        for name, entry in (inputs.get("artifacts") or {}).items()
    }
    uris = {name[: -len("_uri")]: str(v) for name, v in params.items() if name.endswith("_uri") and name != "output_uri" and v}
    out_artifacts = {name: _artifact_from_executor(entry) for name, entry in (outputs.get("artifacts") or {}).items()}
    output_paths = {name: a.path for name, a in out_artifacts.items() if a is not None}
    names = setting_names(step)
    settings = {k: v for k, v in params.items() if k in names}  # KFP leaves unset ones out
    result, metadata = launch_fn(
        step,
        with_settings(params.get("spec", "{}"), settings),
        artifacts=artifacts,
        uris=uris,
        output_uri=output_prefix(str(params.get("output_uri", "")), str(params.get("output_subpath", ""))),
        output_paths=output_paths,
    )
    executor_output = {
        "artifacts": {
            name: {"artifacts": [{"name": name, "uri": a.uri, "metadata": metadata.get(name, {})}]}
            for name, a in out_artifacts.items()
            if a is not None
        }
    }
    output_file = outputs.get("outputFile")
    if output_file:
        Path(output_file).parent.mkdir(parents=True, exist_ok=True)
        Path(output_file).write_text(json.dumps(executor_output))
    print(result.model_dump_json(indent=2))
    return executor_output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("step", help=f"The step (or '{LATEST}') to run.")
    parser.add_argument("--executor-input", required=True, help="KFP's executor input JSON ('{{$}}').")


def run_from_args(args: argparse.Namespace) -> int:
    try:
        executor_input = json.loads(args.executor_input)
    except ValueError as e:
        raise SpecError(f"--executor-input: not valid JSON ({e.msg})") from None
    run_executor_input(args.step, executor_input)
    return 0

