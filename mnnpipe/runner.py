"""Run one step: validate, fetch inputs, consult the cache, run, verify, publish.

This is the only place that knows about caching, manifests and publishing; steps only read
local inputs through `ctx.local(uri)` and write files into `ctx.outdir`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

from pydantic import BaseModel, ValidationError

from . import __version__
from .errors import InputError, IntegrityError, MnnpipeError, SpecError
from .specs import Artifact, DatasetRef, ModelRef, StepResult, StepSpec, format_validation_error  # noqa: F401 - recipe imports it from here
from .catalog import StepDef, get
from .context import StepContext, cache_root
from .store import MANIFEST, RESULT, OutputLock, fetch, fetch_verified, iter_files, join, same_location, sha256_file, sha256_path, store_for

log = logging.getLogger("mnnpipe")
T = TypeVar("T")

MEDIA_TYPES = {
    ".mnn": "application/x-mnn",
    ".onnx": "application/onnx",
    ".pt": "application/x-torchscript",
    ".pt2": "application/x-torch-export",
    ".pth": "application/x-torch-state-dict",
    ".json": "application/json",
    ".md": "text/markdown",
    ".html": "text/html",
    ".png": "image/png",
    ".npz": "application/x-npz",
}


def parse_spec(step: str, data: dict[str, Any]) -> StepSpec:
    """Validate a spec dict; the first problem becomes one line naming the field."""
    spec_cls = get(step).spec
    data = dict(data)
    kind = data.setdefault("kind", step)
    if kind != step:
        raise SpecError(f"kind: spec is for step '{kind}', not '{step}'")
    try:
        return spec_cls.model_validate(data)
    except ValidationError as e:
        raise SpecError(format_validation_error(e)) from None


def input_fields(spec: BaseModel) -> dict[tuple[str | int, ...], str]:
    """Every input URI a spec names (ModelRefs and DatasetRefs, nested and in lists), by the path
    of its `uri` field in the spec's JSON form, e.g. ('candidates', 1, 'model', 'uri')."""
    found: dict[tuple[str | int, ...], str] = {}

    def walk(value: Any, path: tuple[str | int, ...]) -> None:
        if isinstance(value, (ModelRef, DatasetRef)):
            if value.uri:
                found[(*path, "uri")] = value.uri
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name), (*path, name))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, (*path, i))
        elif isinstance(value, dict):
            for k, item in value.items():
                walk(item, (*path, k))

    walk(spec, ())
    return found


def input_refs(spec: BaseModel) -> list[str]:
    """Every input URI a spec names, once each, in spec order."""
    return list(dict.fromkeys(input_fields(spec).values()))


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"mnnpipe": __version__, "python": sys.version.split()[0]}
    for dist in ("torch", "MNN", "onnx", "onnxruntime"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


# The engines whose versions shape a step's output: a new MNN or torch is new work.
KEY_ENGINES = ("mnnpipe", "torch", "MNN", "onnx", "onnxruntime")


def cache_key(step: str, spec: StepSpec, digests: dict[str, str]) -> str:
    """Same step, same spec and same input bytes in the same roles, same engines -> same key.

    Each input URI in the spec is replaced by its content digest where it stands (its role is
    its field path), so the same bytes under a new prefix hit, and two inputs that swap contents
    at fixed URIs miss. Where the step publishes (`output`) is not part of the work.
    """
    body = spec.model_dump(mode="json", exclude={"output"})
    for path, uri in input_fields(spec).items():
        node = body
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = f"sha256:{digests[uri]}" if uri in digests else uri
    engines = versions()
    key = {"step": step, "spec": body, "engines": {name: engines.get(name) for name in KEY_ENGINES}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def cache_index_uri(output: str, key: str) -> str:
    """Where the cache entry for `key` lives: under the cache root (MNNPIPE_CACHE_URI, else beside the outputs' store)."""
    return join(cache_root(output), f"{key}.json")


def read_manifest(output: str) -> dict[str, Any] | None:
    """The output's manifest, or None when it is not published: absent, vanished, or unparseable."""
    uri = join(output, MANIFEST)
    store = store_for(uri)
    if not store.exists(uri):
        return None
    try:
        manifest = json.loads(store.read_bytes(uri))
    except (ValueError, InputError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _cached(step: str, spec: StepSpec, key: str, result_cls: type[StepResult]) -> StepResult | None:
    """An earlier complete output with this key, re-published under spec.output if needed.

    Every artifact is checked against its recorded sha256 and size (not only that it exists):
    a damaged or missing one makes this a miss, so the step runs again and republishes.
    """
    index_uri = cache_index_uri(spec.output, key)
    store = store_for(index_uri)
    try:
        if not store.exists(index_uri):
            return None
        earlier_output = json.loads(store.read_bytes(index_uri))["output"]
    except (ValueError, KeyError, TypeError, MnnpipeError):
        return None
    manifest = read_manifest(earlier_output)
    if not manifest or manifest.get("cache_key") != key:
        return None  # overwritten or never completed: recompute
    try:
        result = result_cls.model_validate(manifest["result"])
        artifacts = [(a["uri"], a["sha256"], a["size"]) for a in manifest["artifacts"].values()]
    except (KeyError, TypeError, AttributeError, ValidationError):
        return None
    same_place = same_location(earlier_output.rstrip("/"), spec.output.rstrip("/"))
    with tempfile.TemporaryDirectory(prefix="mnnpipe-cache-") as tmp:
        outdir = Path(tmp) / "out"
        outdir.mkdir()
        base = earlier_output.rstrip("/") + "/"
        try:
            for uri, sha256, size in artifacts:
                local = fetch_verified(uri, sha256, size, Path(tmp) / "fetch")
                if not same_place:
                    rel = uri[len(base) :]
                    (outdir / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(local, outdir / rel)
        except (InputError, IntegrityError) as e:
            log.warning("cache entry %s is not intact (%s): running the step again", key[:12], e)
            return None
        if same_place:
            _restore_result(earlier_output, manifest["result"])
            return result.model_copy(update={"cached": True})
        # Same work, new place: publish the verified bytes with a manifest of our own.
        fresh = result.model_copy(update={"artifacts": {}, "cached": True})
        return publish(step, spec, fresh, outdir, manifest["inputs"], key, manifest.get("started_at", ""), cached_from=earlier_output)


def _restore_result(output: str, recorded: dict[str, Any]) -> None:
    """Put result.json back as the manifest records it, if it was deleted or altered."""
    uri = join(output, RESULT)
    store = store_for(uri)
    try:
        current = json.loads(store.read_bytes(uri))
    except (InputError, ValueError):
        current = None
    if current != recorded:
        log.warning("%s was missing or altered: restored from the manifest", uri)
        store.write_bytes(json.dumps(recorded, indent=2).encode(), uri)


def publish(
    step: str,
    spec: StepSpec,
    result: StepResult,
    outdir: Path,
    input_digests: dict[str, str],
    key: str,
    started_at: str,
    cached_from: str | None = None,
) -> StepResult:
    """Upload every file in outdir, then result.json, then manifest.json (last: the commit point)."""
    output = spec.output.rstrip("/")
    manifest_uri = join(output, MANIFEST)
    store = store_for(manifest_uri)
    # An older manifest must not vouch for files we are about to replace.
    store.delete(manifest_uri)
    artifacts: dict[str, Artifact] = {}
    for path in iter_files(outdir):
        rel = path.relative_to(outdir).as_posix()
        if rel in (MANIFEST, RESULT):
            raise AssertionError(f"a step must not write {rel} itself")
        uri = join(output, rel)
        digest = sha256_file(path)  # once: the upload's metadata and the manifest share it
        store_for(uri).put(path, uri, sha256=digest)
        artifacts[rel] = Artifact(
            uri=uri, sha256=digest, size=path.stat().st_size, media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream")
        )
    final = result.model_copy(update={"artifacts": {**artifacts, **result.artifacts}, "output": output, "cache_key": key})
    result_json = final.model_dump_json(indent=2).encode()
    store.write_bytes(result_json, join(output, RESULT))
    manifest = {
        "schema_version": 1,
        "step": step,
        "spec": spec.model_dump(mode="json"),
        "inputs": input_digests,
        "artifacts": {k: v.model_dump() for k, v in final.artifacts.items()},
        "result": json.loads(result_json),
        "metrics": final.metrics,
        "versions": versions(),
        "cache_key": key,
        "cached_from": cached_from,
        "started_at": started_at,
        "finished_at": _now(),
    }
    store.write_bytes(json.dumps(manifest, indent=2, sort_keys=True).encode(), manifest_uri)
    # The manifest is the commit point: the step is published. The cache index only saves work
    # later, so failing to write it is a warning, never a failure of a published step.
    index_uri = cache_index_uri(output, key)
    try:
        store_for(index_uri).write_bytes(json.dumps({"output": output, "step": step}).encode(), index_uri)
    except MnnpipeError as e:
        log.warning("published %s, but could not record it in the cache index (%s)", output, e)
    return final


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


#: Process-wide settings steps change (torch.load's weights-only switch is read at each call).
_ENV_SETTINGS = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD",)


@contextmanager
def _process_settings_kept() -> Iterator[None]:
    """Put back what a step changes for the whole process: torch's deterministic-algorithms mode
    and thread count, and _ENV_SETTINGS. An in-process run (an Airflow worker, a notebook) then
    leaves its host as it found it. When torch was not imported before the step, its modes go
    back to torch's defaults (not deterministic); its thread count stays what torch chose."""
    env = {name: os.environ.get(name) for name in _ENV_SETTINGS}
    torch_before = sys.modules.get("torch")
    if torch_before is not None:
        torch_state = (
            torch_before.are_deterministic_algorithms_enabled(),
            torch_before.is_deterministic_algorithms_warn_only_enabled(),
            torch_before.get_num_threads(),
        )
    try:
        yield
    finally:
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        torch = sys.modules.get("torch")
        if torch is not None:
            if torch_before is not None:
                deterministic, warn_only, threads = torch_state
                torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
                if torch.get_num_threads() != threads:
                    torch.set_num_threads(threads)
            else:
                torch.use_deterministic_algorithms(False)


def run_step(step: str, spec: StepSpec | dict[str, Any], *, use_cache: bool = True, quiet: bool = False) -> StepResult:
    """Validate the spec, fetch and digest inputs, serve from cache or run, publish. The one entry point."""
    definition = get(step)
    if not isinstance(spec, StepSpec):
        spec = parse_spec(step, spec)
    elif not isinstance(spec, definition.spec):
        raise SpecError(f"kind: spec is for step '{spec.kind}', not '{step}'")
    with _process_settings_kept():
        return _run(definition, spec, use_cache=use_cache, quiet=quiet)


def _run(definition: StepDef, spec: StepSpec, *, use_cache: bool, quiet: bool) -> StepResult:
    step = definition.name
    started_at = _now()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"mnnpipe-{step}-") as tmp, OutputLock(spec.output):
        ctx = StepContext(workdir=Path(tmp), outdir=Path(tmp) / "out", quiet=quiet, output=spec.output)
        ctx.outdir.mkdir()
        for uri in input_refs(spec):
            ctx.local(uri)
        key = ctx.key = cache_key(step, spec, ctx.input_digests)
        if use_cache and definition.cacheable:
            hit = _cached(step, spec, key, definition.result)
            if hit is not None:
                log.info("cache hit for %s (key %s): skipped the work", step, key[:12])
                return _after_publish(definition, spec, hit, ctx)
        log.info("running %s -> %s", step, spec.output)
        result = definition.run(spec, ctx)
        if not isinstance(result, definition.result):
            raise AssertionError(f"step {step} returned {type(result).__name__}, not its Result")
        result.metrics.setdefault("step_seconds", round(time.perf_counter() - t0, 3))
        return _after_publish(definition, spec, publish(step, spec, result, ctx.outdir, ctx.input_digests, key, started_at), ctx)


def _after_publish(definition: StepDef, spec: StepSpec, result: StepResult, ctx: StepContext) -> StepResult:
    """What may happen only once the output's manifest exists, under the output lock: the step's
    checkpoints (model-sized, outside the manifest, kept only to resume a crashed run) go, then
    the step's own `after_publish` hook runs (the gate moves `latest.json` to the release)."""
    ctx.checkpoints.clear()
    hook = definition.after_publish
    return hook(spec, result) if hook is not None else result
