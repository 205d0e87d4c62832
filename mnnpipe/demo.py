"""The main job: a whole compression pipeline on the embedded default (a local artifact folder)
and bundled demo data (scikit-learn's handwritten digits, real scans shipped with the package).

    train teacher -> distill -> prune -> convert -> quantize -> benchmark

Each stage is the real step, run through `run_step` exactly as the CLI, KFP and Airflow run it,
so a second run is served from the content-addressed cache.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .specs import StepResult

DIGITS = {"format": "sklearn-digits", "preprocess": {"channels": "GRAY"}}
INPUT = {"name": "input", "shape": [1, 1, 8, 8]}


def digits(split: str, **extra: Any) -> dict[str, Any]:
    return {**DIGITS, "split": split, **extra}


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


def pipeline_specs(workdir: Path, teacher: Path) -> list[tuple[str, Any]]:
    """Specs of each stage; later ones read earlier results (a callable gets the results so far)."""
    out = lambda name: str(workdir / name)  # noqa: E731
    teacher_ref = {"uri": str(teacher), "format": "state-dict", "factory": "mnnpipe.models:digits_cnn"}
    return [
        ("distill", lambda r: {
            "output": out("distill"),
            "teacher": teacher_ref,
            "student": {"architecture": "digits_cnn", "width": 0.5},
            "dataset": {**DIGITS},
            "temperature": 4.0,
            "alpha": 0.7,
            "training": {"epochs": 20, "lr": 2e-3, "patience": 6},
        }),
        ("prune", lambda r: {
            "output": out("prune"),
            "model": {
                "uri": r["distill"].artifacts["student.pth"].uri,
                "format": "state-dict",
                "factory": r["distill"].student_factory,
                "factory_kwargs": r["distill"].student_factory_kwargs,
            },
            "input": INPUT,
            "method": "structured",
            "importance": "activation",
            "target": {"by": "channels", "ratio": 0.3},
            "calibration": digits("train", limit=256),
            "finetune": {"dataset": digits("train"), "epochs": 8, "distill": True},
            "evaluation": digits("test"),
        }),
        ("convert", lambda r: {
            "output": out("convert"),
            "model": {"uri": r["prune"].artifacts["model.pt"].uri},
            "inputs": [INPUT],
            "samples": digits("test"),
            "num_samples": 64,
        }),
        ("quantize", lambda r: {
            "output": out("quantize"),
            "model": {"uri": r["convert"].artifacts["model.mnn"].uri},
            "input": INPUT,
            "mode": "full-int8",
            "calibration": digits("train"),
            "evaluation": digits("test"),
            "calibration_samples": 200,
            "max_accuracy_drop": 1.0,
        }),
        ("benchmark", lambda r: {
            "output": out("benchmark"),
            "models": [
                {"label": "teacher-torch", "model": teacher_ref},
                {"label": "student-torch", "model": {"uri": r["distill"].artifacts["model.pt"].uri}},
                {"label": "pruned-torch", "model": {"uri": r["prune"].artifacts["model.pt"].uri}},
                {"label": "pruned-mnn-fp32", "model": {"uri": r["convert"].artifacts["model.mnn"].uri}},
                {"label": "pruned-mnn-int8", "model": {"uri": r["quantize"].artifacts["model.mnn"].uri}},
            ],
            "dataset": digits("test"),
            "inputs": [INPUT],
            "threads": [1],
            "warmup": 10,
            "iterations": 100,
            "reference": "pruned-mnn-fp32",
        }),
    ]


def run_demo(workdir: Path, *, use_cache: bool = True, quiet: bool = False) -> dict[str, StepResult]:
    from .runner import run_step

    workdir = workdir.resolve()
    t0 = time.perf_counter()
    say = (lambda *a: None) if quiet else print
    say(f"mnnpipe demo: artifacts in {workdir}")
    teacher = train_teacher(workdir / "teacher")
    say(f"  teacher    trained on digits ({json.loads((workdir / 'teacher' / 'teacher.json').read_text())['test_accuracy']:.1%} test top-1)")
    results: dict[str, StepResult] = {}
    for step, make_spec in pipeline_specs(workdir, teacher):
        started = time.perf_counter()
        results[step] = run_step(step, make_spec(results), use_cache=use_cache, quiet=quiet)
        cached = " (cached)" if results[step].cached else ""
        say(f"  {step:<10} {summary(step, results[step])}  [{time.perf_counter() - started:.1f} s{cached}]")
    report = results["benchmark"].artifacts.get("report.md")
    if report is not None:
        say("")
        say(Path(report.uri).read_text().strip())
    say("")
    say(f"done in {time.perf_counter() - t0:.0f} s. Artifacts (each folder has manifest.json + result.json):")
    for step, result in results.items():
        say(f"  {step:<10} {result.output}")
    return results


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
    return f"{len(r.models)} models measured on {r.eval_samples} samples"
