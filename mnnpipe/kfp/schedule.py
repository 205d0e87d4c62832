"""Nightly recurring runs and recompression of new model versions, through `kfp.Client`.

KFP has no event trigger of its own, so something outside (a cron job, an Airflow task, an S3
event consumer) calls `recompress`: it lists a model registry prefix
(`s3://bucket/models/<name>/<version>/model.<ext>`) and starts one run per version that has no
release for this recipe yet. The release marker is the gate's manifest,
`<release_root>/<name>/<version>/<recipe digest>/manifest.json`, so calling it twice starts nothing
new, and a changed recipe (new digest) compresses every version again.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ..errors import SpecError
from ..specs import check_uri
from ..registry import ModelVersion, list_versions
from ..store import MANIFEST, join, store_for
from .pipeline import DEFAULT_RELEASE_ROOT, DEFAULT_STORE_PREFIX, build_pipeline, compile_pipeline
from .recipe import parse_recipe, recipe_digest

DEFAULT_CRON = "0 0 2 * * *"  # 02:00 every day; KFP's cron has six fields, seconds first


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
) -> Any:
    """A recurring run of the compress pipeline: validated recipe, 6-field cron, no catch-up, one at a time."""
    cron = check_cron(cron_expression)
    recipe = parse_recipe(recipe, model_uri=params.get("model_uri", ""))
    with tempfile.TemporaryDirectory(prefix="mnnpipe-kfp-") as tmp:
        package = _compiled(recipe, Path(tmp))
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
    return join(release_root, name, version, digest, MANIFEST)


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
) -> list[ModelVersion]:
    """Start a compress run for every model version without a release for this recipe; return them."""
    recipe = parse_recipe(recipe)
    digest = recipe_digest(recipe)
    pending = [
        v for v in list_versions(check_uri(registry_prefix, "registry_prefix")) if not store_for(release_root).exists(release_marker(release_root, v.name, v.version, digest))
    ]
    if not pending:
        return []
    with tempfile.TemporaryDirectory(prefix="mnnpipe-kfp-") as tmp:
        package = _compiled(recipe, Path(tmp))
        for v in pending:
            parse_recipe(recipe, model_uri=v.model_uri)  # the model file's extension must fit the recipe's format
            client.create_run_from_pipeline_package(
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
    return pending
