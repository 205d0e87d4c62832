"""Nightly recurring runs and recompression of new model versions, through `kfp.Client`.

KFP has no event trigger of its own, so something outside (a cron job, an Airflow task, an S3
event consumer) calls `recompress`: it lists a model registry prefix
(`s3://bucket/models/<name>/<version>/model.<ext>`) and starts one run per version that has no
release for this recipe yet. The release marker is the gate's manifest,
`<release_root>/<name>/<version>/<recipe digest>/manifest.json`, so calling it twice starts nothing
new, and a changed recipe (new digest) compresses every version again.

Each start is recorded in the step store, `<store_prefix>/<name>/<version>/<digest>/recompress.json`
({"attempts", "run_id", "started_at"}): a version whose last run is still in flight is skipped
(no duplicate run), and a version that is still unreleased after its run ended (its run or its
gate failed) is retried only after an exponential back-off (1 h, 2 h, 4 h ... at most 24 h), and
not at all after MAX_ATTEMPTS. Every skip is logged with its reason; delete the record to retry now.
"""

from __future__ import annotations

import json
import logging
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from ..container import resolve_image
from ..errors import SpecError
from ..specs import check_uri
from ..registry import ModelVersion, list_versions
from ..release import release_prefix
from ..store import MANIFEST, join, store_for
from .pipeline import DEFAULT_RELEASE_ROOT, DEFAULT_STORE_PREFIX, build_pipeline, compile_pipeline
from ..recipe import parse_recipe, recipe_digest

log = logging.getLogger(__name__)

DEFAULT_CRON = "0 0 2 * * *"  # 02:00 every day; KFP's cron has six fields, seconds first
#: KFP run states in which a run may still release its version.
ACTIVE_STATES = frozenset({"PENDING", "RUNNING", "PAUSED", "CANCELING", "RUNTIME_STATE_UNSPECIFIED"})
BACKOFF_BASE = timedelta(hours=1)
BACKOFF_MAX = timedelta(hours=24)
MAX_ATTEMPTS = 6
ATTEMPTS_FILE = "recompress.json"  # per-version launch attempts, in the version's release folder


def check_cron(expr: str) -> str:
    fields = expr.split()
    if len(fields) != 6:
        raise SpecError(
            f"cron_expression: KFP needs 6 fields (second minute hour day month weekday), got {len(fields)} in '{expr}'"
        )
    return " ".join(fields)


def _compiled(recipe: Any, workdir: Path, **defaults: Any) -> Path:
    path = workdir / "compress.yaml"
    compile_pipeline(build_pipeline(recipe, **defaults), str(path))
    return path


def _experiment_id(client: Any, name: str) -> str:
    try:
        return client.get_experiment(experiment_name=name).experiment_id
    except Exception:  # kfp raises ValueError (not found) or an ApiException, depending on the server
        return client.create_experiment(name).experiment_id


def create_nightly_run(
    client: Any,
    recipe: Any,
    *,
    params: dict[str, str],
    job_name: str = "mnnpipe-compress-nightly",
    experiment: str = "mnnpipe",
    cron_expression: str = DEFAULT_CRON,
    pipeline_root: str | None = None,
    image: str | None = None,
) -> Any:
    """A recurring run of the compress pipeline: validated recipe, 6-field cron, no catch-up, one at a time.

    `params` with `model_registry` (recommended): each run compresses the newest version under it,
    resolved when the run starts. With `model_uri` (and model_name, model_version) instead: that
    one model on every run.
    `image`: the step image (None: $MNNPIPE_IMAGE, else the package's default tag)."""
    cron = check_cron(cron_expression)
    registry = params.get("model_registry")
    if registry is not None and "model_uri" in params:
        raise SpecError("params: give model_registry (newest version at each run) or model_uri (one fixed model), not both")
    if registry is not None:
        try:
            check_uri(registry, "model_registry")
        except ValueError as e:
            raise SpecError(f"params.{e}") from None
    recipe = parse_recipe(recipe, model_uri=params.get("model_uri", ""))
    with tempfile.TemporaryDirectory(prefix="mnnpipe-kfp-") as tmp:
        package = _compiled(recipe, Path(tmp), image=resolve_image(image), model_registry=registry)
        return client.create_recurring_run(
            experiment_id=_experiment_id(client, experiment),
            job_name=job_name,
            cron_expression=cron,
            max_concurrency=1,
            no_catchup=True,
            params=dict(params),
            pipeline_package_path=str(package),
            pipeline_root=pipeline_root,
            enable_caching=False,
        )


def release_marker(release_root: str, name: str, version: str, digest: str) -> str:
    return join(release_prefix(release_root, name, version, digest), MANIFEST)


def attempts_uri(store_prefix: str, name: str, version: str, digest: str) -> str:
    return join(store_prefix, name, version, digest, ATTEMPTS_FILE)


def _run_state(client: Any, run_id: str) -> str:
    try:
        run = client.get_run(run_id)
    except Exception as e:  # kfp raises ApiException or ValueError, depending on the server
        log.warning("could not read the state of run %s (%s); treating it as ended", run_id, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return "UNKNOWN"
    return str(getattr(run, "state", "") or "UNKNOWN").upper()


def skip_reason(client: Any, record: dict | None, now: datetime) -> str | None:
    """Why a version with this attempts record must not start now, or None to start it."""
    if not record:
        return None
    run_id = record.get("run_id", "")
    if run_id:
        state = _run_state(client, run_id)
        if state in ACTIVE_STATES:
            return f"its run {run_id} is still {state}"
    attempts = int(record.get("attempts", 0))
    if attempts >= MAX_ATTEMPTS:
        return f"gave up after {attempts} runs that released nothing (delete {ATTEMPTS_FILE} to retry)"
    wait = min(BACKOFF_BASE * 2 ** max(attempts - 1, 0), BACKOFF_MAX)
    retry_at = datetime.fromisoformat(record["started_at"]) + wait
    if now < retry_at:
        return f"{attempts} earlier run(s) released nothing; backing off until {retry_at.isoformat(timespec='seconds')}"
    return None


def recompress(
    client: Any,
    registry_prefix: str,
    recipe: Any,
    *,
    release_root: str = DEFAULT_RELEASE_ROOT,
    store_prefix: str = DEFAULT_STORE_PREFIX,
    data_uris: dict[str, str] | None = None,
    experiment: str = "mnnpipe",
    pipeline_root: str | None = None,
    image: str | None = None,
    now: datetime | None = None,
) -> list[ModelVersion]:
    """Start a compress run for every model version without a release for this recipe, unless
    its last run is in flight or it is backing off after failures; return the versions started.

    `image`: the step image (None: $MNNPIPE_IMAGE, else the package's default tag)."""
    recipe = parse_recipe(recipe)
    digest = recipe_digest(recipe)
    pending = [
        v for v in list_versions(check_uri(registry_prefix, "registry_prefix")) if not store_for(release_root).exists(release_marker(release_root, v.name, v.version, digest))
    ]
    now = now or datetime.now(timezone.utc)
    records: dict[str, tuple[str, dict | None]] = {}
    startable = []
    for v in pending:
        uri = attempts_uri(store_prefix, v.name, v.version, digest)
        store = store_for(uri)
        record = json.loads(store.read_bytes(uri)) if store.exists(uri) else None
        reason = skip_reason(client, record, now)
        if reason:
            log.warning("recompress: skipped %s version %s: %s", v.name, v.version, reason)
            continue
        records[v.version] = (uri, record)
        startable.append(v)
    if not startable:
        return []
    started = []
    with tempfile.TemporaryDirectory(prefix="mnnpipe-kfp-") as tmp:
        package = _compiled(recipe, Path(tmp), image=resolve_image(image))
        for v in startable:
            parse_recipe(recipe, model_uri=v.model_uri)  # the model file's extension must fit the recipe's format
            run = client.create_run_from_pipeline_package(
                str(package),
                arguments={
                    "model_uri": v.model_uri,
                    "model_name": v.name,
                    "model_version": v.version,
                    "store_prefix": store_prefix,
                    "release_root": release_root,
                    **(data_uris or {}),
                },
                run_name=f"compress-{v.name}-{v.version}-{digest}",
                experiment_name=experiment,
                pipeline_root=pipeline_root,
                enable_caching=False,
            )
            uri, record = records[v.version]
            attempt = {"attempts": int((record or {}).get("attempts", 0)) + 1, "run_id": str(getattr(run, "run_id", "") or ""), "started_at": now.isoformat()}
            store_for(uri).write_bytes(json.dumps(attempt, sort_keys=True).encode(), uri)
            log.info("recompress: started %s version %s (attempt %d, run %s)", v.name, v.version, attempt["attempts"], attempt["run_id"])
            started.append(v)
    return started
