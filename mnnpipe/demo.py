"""The main job: a whole compression pipeline on the embedded default (a local artifact folder)
and bundled demo data (scikit-learn's handwritten digits, real scans shipped with the package).

    train teacher -> distill -> prune -> convert -> quantize -> benchmark -> gate (release)

The steps are the default recipe (mnnpipe.default_recipe) rendered locally (mnnpipe.local): the
same recipe object the KFP pipeline and the Airflow DAGs render, each step run through
`run_step` as the CLI, KFP and Airflow run it, so a second run is served from the cache.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .default_recipe import DEFAULT_RECIPE, digits
from .specs import StepResult

#: The demo's model name and version in its local release folder.
NAME, VERSION = "digits", "1"


def train_teacher(folder: Path, epochs: int = 15) -> Path:
    """A digits CNN trained from scratch: the model a team would bring to the pipeline."""
    path = folder / "teacher.pth"
    if path.exists():  # deterministic training: the same seed gives the same weights
        return path  # before any torch import: a cached demo run never needs torch in this process
    import torch

    from .data import load_dataset
    from .models import digits_cnn
    from .specs import DatasetRef
    from .train import FitConfig, accuracy, fit

    train, val, test = (load_dataset(DatasetRef.model_validate(digits(s))) for s in ("train", "val", "test"))
    model = digits_cnn()
    fit(model, train, FitConfig(epochs=epochs, lr=2e-3, seed=0), val=val)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    (folder / "teacher.json").write_text(json.dumps({"test_accuracy": accuracy(model, test), "epochs": epochs}))
    return path


def run_demo(workdir: Path, *, use_cache: bool = True, quiet: bool = False, recipe: dict[str, Any] | None = None) -> dict[str, StepResult]:
    """Train the teacher, then run the default recipe on it (mnnpipe.default_recipe) exactly as
    KFP and Airflow run it, releasing under `<workdir>/released`. Returns each step's result."""
    from .local import run_recipe

    workdir = workdir.resolve()
    t0 = time.perf_counter()
    say = (lambda *a: None) if quiet else print
    say(f"mnnpipe demo: artifacts in {workdir}")
    teacher = train_teacher(workdir / "teacher")
    say(f"  teacher    trained on digits ({json.loads((workdir / 'teacher' / 'teacher.json').read_text())['test_accuracy']:.1%} test top-1)")

    def report(step: str, result: StepResult, seconds: float) -> None:
        cached = " (cached)" if result.cached else ""
        say(f"  {step:<10} {summary(step, result)}  [{seconds:.1f} s{cached}]")

    run = run_recipe(
        recipe or DEFAULT_RECIPE, model_uri=str(teacher), output=str(workdir), release_root=str(workdir / "released"),
        name=NAME, version=VERSION, use_cache=use_cache, quiet=quiet, on_step=report,
    )  # fmt: skip
    results = {**run.results, **({run.plan.release.step: run.release} if run.release is not None else {}), **({"trend": run.trend} if run.trend is not None else {})}
    report_md = results["benchmark"].artifacts.get("report.md") if "benchmark" in results else None
    if report_md is not None:
        say("")
        say(Path(report_md.uri).read_text().strip())
    say("")
    say(f"done in {time.perf_counter() - t0:.0f} s. Artifacts (each folder has manifest.json + result.json):")
    for step, result in results.items():
        say(f"  {step:<10} {result.output}")
    return results


def run_demo_search(workdir: Path, *, use_cache: bool = True, quiet: bool = False, workers: int = 1) -> Any:
    """The demo's recipe search (mnnpipe.default_recipe.demo_search) on the demo's teacher: six
    candidates, the best released under `<workdir>/released/digits/1/<search digest>/`."""
    from .default_recipe import demo_search
    from .searching import run_search

    workdir = workdir.resolve()
    say = (lambda *a: None) if quiet else print
    teacher = train_teacher(workdir / "teacher")
    t0 = time.perf_counter()
    spec = demo_search()
    say(f"\nmnnpipe demo --search: {len(spec['space'])} dimensions, budget {spec['budget']}, objective {spec['objective']['kind']}")

    def progress(c: Any, run: Any, error: str | None) -> None:
        what = error or f"{run.cache_hits}/{len(run.results)} steps from the cache"
        say(f"  {c.id}  {', '.join(f'{k}={_short(v)}' for k, v in c.overrides.items()):<45} {what}")

    search = run_search(
        spec, model_uri=str(teacher), output=str(workdir / "search"), release_root=str(workdir / "released"),
        name=NAME, version=VERSION, workers=workers, use_cache=use_cache, quiet=quiet, on_candidate=progress,
    )  # fmt: skip
    print_search(search, say)
    say(f"search done in {time.perf_counter() - t0:.0f} s")
    return search


def _short(value: Any) -> str:
    """A search value in a progress line: a whole section is `on` (`off` when removed)."""
    if value is None:
        return "off"
    return "on" if isinstance(value, dict) else json.dumps(value)


def print_search(search: Any, say: Any) -> None:
    """The front, the choice and where the report and the release are."""
    selected = search.selected
    say("")
    say(Path(selected.artifacts["report.md"].uri).read_text().strip() if "://" not in selected.artifacts["report.md"].uri else selected.reason)
    say("")
    say(f"cache: {search.cache_hits} of {search.steps_run} candidate steps served from the cache")
    say(f"chosen: {selected.chosen} — {selected.reason}")
    say(f"report: {selected.artifacts['report.html'].uri}")
    if search.release is not None:
        say(f"released: {search.release.released} (latest moved: {search.release.latest_moved})")
    if search.trend is not None:
        say(f"trend: {search.trend.artifacts['trend.html'].uri} ({search.trend.releases} releases, regression: {search.trend.regression})")


def summary(step: str, r: Any) -> str:
    """One line of the numbers that matter for each step."""
    if step == "distill":
        return f"student {r.student_params:,} params ({r.params_ratio:.0%} of teacher), top-1 {r.student_accuracy:.1%} vs teacher {r.teacher_accuracy:.1%}"
    if step == "prune":
        return f"params {r.params_before:,} -> {r.params_after:,}, MACs x{r.macs_ratio:.2f}, top-1 {r.accuracy_before:.1%} -> {r.accuracy_after:.1%}"
    if step == "convert":
        return f"model.mnn {r.mnn_bytes:,} B, max abs error {r.fidelity.max_abs_error:.1e}, top-1 agreement {r.fidelity.top1_agreement:.0%}"
    if step == "quantize":
        return f"int8 model.mnn {r.size_bytes:,} B ({r.size_ratio:.2f}x fp32), top-1 {r.fp32.accuracy:.1%} -> {r.quantized.accuracy:.1%}"
    if step == "benchmark":
        return f"{len(r.models)} models measured on {r.eval_samples} samples"
    if step == "trend":
        flag = f"REGRESSION: {'; '.join(r.reasons)}" if r.regression else "no regression"
        return f"{r.releases} release(s) of {NAME}, newest {r.newest}: {flag}"
    if step == "gate":
        return f"released {r.metric} {r.value:.1%} ({r.drop:+.2f} points vs {r.reference:.1%}) -> latest: {r.latest_moved}" if r.drop is not None else f"released {r.metric} {r.value:.4g}"
    return ", ".join(f"{k}={v:.4g}" for k, v in list(r.metrics.items())[:4])
