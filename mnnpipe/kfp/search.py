"""The recipe search as a KFP pipeline: the candidates fan out in a `dsl.ParallelFor`, each a
normal chain of mnnpipe step tasks, and fan in (`dsl.Collected`) to the `select` step, whose
chosen model the release gate releases.

Candidates are computed when the pipeline is built (mnnpipe.search.spec: a grid or a seeded
sample), validated as recipes then, and compiled in as the loop's items: one spec per step per
candidate. A ParallelFor body is one fixed chain, so every candidate must run the same steps
(toggling a step on and off is for `mnnpipe search`, which runs each chain separately). KFP runs
`parallelism` candidates at once; their shared prefixes are computed once through mnnpipe's
content-addressed cache (one distilled student for every prune ratio) when the step store is
shared, so the first candidates of each prefix pay and the rest hit.
"""

from __future__ import annotations

import inspect
import json
from typing import Any, Literal

from ..container import image_note, resolve_image
from ..searching import SELECT_STEP, one_chain, search_candidates, search_digest, select_spec
from .interface import OUTPUT_METRICS, OUTPUT_MODEL
from .pipeline import DEFAULT_RELEASE_ROOT, DEFAULT_STORE_PREFIX, render_release, render_steps, render_trend

PIPELINE_NAME = "mnnpipe-search"


def build_search_pipeline(
    search: Any,
    *,
    form: Literal["container", "lightweight"] = "container",
    image: str | None = None,
    model_uri: str = "",
    model_name: str = "model",
    model_version: str = "1",
    store_prefix: str = DEFAULT_STORE_PREFIX,
    release_root: str = DEFAULT_RELEASE_ROOT,
    parallelism: int = 4,
    pipeline_root: str | None = None,
) -> Any:
    """The search pipeline for a search spec (validated first: SpecError names the field).
    Candidates publish to `<store_prefix>/<name>/<version>/search-<digest>/<candidate>/<step>`,
    the selection to `.../select`, the release to `<release_root>/<name>/<version>/<digest>/`."""
    from kfp import dsl

    parsed, cands = search_candidates(search)
    digest = search_digest(parsed)
    image = resolve_image(image)
    plans = one_chain(
        cands, why="a KFP ParallelFor runs one chain of steps for every candidate; search steps on and off with "
        "`mnnpipe search` or the Airflow search DAG, or in separate pipelines",
    )
    template = plans[0]
    items = [
        {"id": c.id, **{s.step: json.dumps(s.spec, sort_keys=True) for s in p.steps}, **{f"{s.step}_output": f"{c.id}/{s.step}" for s in p.steps}}
        for c, p in zip(cands, plans)
    ]
    release = template.release
    records = [{"id": c.id, "overrides": c.overrides, "recipe_digest": p.digest, "model": {}} for c, p in zip(cands, plans)]
    spec_of_select = select_spec(parsed, digest, template, records, ids_in_uris=True)
    defaults = {
        "model_uri": model_uri,
        "model_name": model_name,
        "model_version": model_version,
        "store_prefix": store_prefix,
        "release_root": release_root,
    }

    def search_pipeline(*args: Any) -> None:
        from .components import make_component, with_task_defaults

        p = dict(zip(defaults, args))
        run_prefix = f"{p['store_prefix']}/{p['model_name']}/{p['model_version']}/search-{digest}"
        with dsl.ParallelFor(items, parallelism=parallelism) as item:
            tasks = render_steps(
                template, form=form, image=image, model_uri=p["model_uri"], run_prefix=run_prefix, dataset_uris={},
                spec_of=lambda planned: getattr(item, planned.step), subpath_of=lambda planned: getattr(item, f"{planned.step}_output"),
            )  # fmt: skip
        chosen = make_component(SELECT_STEP, form, image)(
            spec=json.dumps(spec_of_select, sort_keys=True),
            output_uri=f"{run_prefix}/{SELECT_STEP}",
            candidates_model=dsl.Collected(tasks[release.candidate_from].outputs[OUTPUT_MODEL]),
            candidates_metrics=dsl.Collected(tasks[release.metrics_from].outputs[OUTPUT_METRICS]),
            **({"candidates_reference_metrics": dsl.Collected(tasks[release.reference_from].outputs[OUTPUT_METRICS])} if release.reference_from else {}),
        )
        with_task_defaults(chosen).set_display_name(SELECT_STEP)
        # The select step's metrics hold the chosen candidate's own (candidate/top1, its model
        # step's fp32_accuracy...): the gate judges it as it would judge a single run.
        gate = render_release(
            template.release, candidate=chosen, metrics=chosen, form=form, image=image,
            output_uri=f"{p['release_root']}/{p['model_name']}/{p['model_version']}/{digest}",
        )  # fmt: skip
        render_trend(gate, form=form, image=image, release_root=p["release_root"], model_name=p["model_name"])

    search_pipeline.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d, annotation=str) for n, d in defaults.items()]
    )
    steps = " -> ".join(s.step for s in template.steps)
    search_pipeline.__doc__ = (
        f"Recipe search {digest}: {len(cands)} candidates ({steps}) in a ParallelFor, then select and gate.\n\n"
        "Args:\n"
        "    model_uri: URI of the source model (s3://... or path).\n"
        "    model_name: Model name; part of the output and release prefixes.\n"
        "    model_version: Model version; part of the output and release prefixes.\n"
        "    store_prefix: Step-store prefix the steps publish under (s3://bucket/prefix).\n"
        "    release_root: Where the gate releases the chosen model: <release_root>/<name>/<version>/<search digest>/.\n"
    )
    description = f"{search_pipeline.__doc__.split(chr(10))[0]} {image_note(image)}"
    return dsl.pipeline(name=PIPELINE_NAME, description=description, pipeline_root=pipeline_root)(search_pipeline)
