"""The release gate on Airflow: the recipe's release step (mnnpipe.steps.gate), fed from XCom.

The plan (`mnnpipe.recipe.plan`) says which step's hand-off is the candidate, which step's
metrics judge it and which step's metrics are the reference; the spec is the plan's release spec
(`mnnpipe.recipe.release_spec`), exactly as KFP and the local runner build it. A released version
is published like a step output (files, manifest.json last) under
`{release_root}/{name}/{version}/{plan digest}/`, then `{release_root}/{name}/latest.json` moves
forward to it (the step's `after_publish`). No Airflow import here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..recipe import PlannedRelease, handoff_uri, release_spec
from ..registry import check_version
from ..release import release_prefix


def gate_and_release(
    release: PlannedRelease,
    *,
    found: Mapping[str, str],
    results: Mapping[str, Mapping[str, Any]],
    release_root: str,
    digest: str,
    move_latest: bool = True,
) -> dict[str, Any]:
    """Run the release step on one compressed version; within budget it publishes the release
    and (with `move_latest`) moves `latest.json`. `results`: the planned steps' Results as dicts
    (XCom), by step name; `digest`: the plan's. Returns the gate's Result as a dict; StepFailed
    when over budget."""
    from ..runner import run_step

    version = check_version(found["version"])
    name = found.get("name") or "model"
    spec = release_spec(
        release,
        candidate_uri=handoff_uri(results[release.candidate_from], release.candidate_from),
        candidate_metrics=results[release.metrics_from]["metrics"],
        reference_metrics=results[release.reference_from]["metrics"] if release.reference_from else None,
        output=release_prefix(release_root, name, version, digest),
        move_latest=move_latest,
    )
    return run_step(release.step, spec, quiet=True).model_dump(mode="json")
