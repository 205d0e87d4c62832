"""Distillation on scikit-learn's digits: how much of a teacher's accuracy a <= 25%-size student keeps.

Trains a digits_cnn teacher (width 1.0), then runs the real `distill` step for students at widths
whose parameter count is at most 25% of the teacher's, each with `baseline: true` (the same
student, same seed, trained without the teacher), over several seeds. Every accuracy is measured
on the 360-image test split, which no model trains or early-stops on.

    python benchmarks/bench_distill.py                    # prints the table
    python benchmarks/bench_distill.py --write benchmarks/results/distill.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mnnpipe.data import load_dataset
from mnnpipe.models import count_params, digits_cnn
from mnnpipe.runner import run_step
from mnnpipe.specs import DatasetRef
from mnnpipe.train import FitConfig, accuracy, fit

DIGITS = {"format": "sklearn-digits", "preprocess": {"channels": "GRAY"}}


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def train_teacher(path: Path, epochs: int) -> float:
    split = lambda s: load_dataset(DatasetRef(**DIGITS, split=s))  # noqa: E731
    torch.manual_seed(0)
    teacher = digits_cnn(width=1.0)
    fit(teacher, split("train"), FitConfig(epochs=epochs, lr=2e-3, seed=0), val=split("val"))
    torch.save(teacher.state_dict(), path)
    return accuracy(teacher, split("test"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=float, nargs="+", default=[0.45, 0.25])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30, help="Student epochs (teacher: the same).")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny models).")
    parser.add_argument("--write", type=Path, help="Also write the Markdown report here.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    teacher_params = count_params(digits_cnn(width=1.0))

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        os.environ["MNNPIPE_CACHE_URI"] = str(Path(tmp) / "cache")  # keep the user's cache clean
        teacher_path = Path(tmp) / "teacher.pth"
        t0 = time.perf_counter()
        teacher_acc = train_teacher(teacher_path, args.epochs)
        print(f"teacher: {teacher_params} params, test accuracy {teacher_acc:.4f} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        for width in args.widths:
            for seed in args.seeds:
                spec = {
                    "output": str(Path(tmp) / f"w{width}-s{seed}"),
                    "seed": seed,
                    "teacher": {"uri": str(teacher_path), "factory": "mnnpipe.models:digits_cnn"},
                    "student": {"architecture": "digits_cnn", "width": width},
                    "dataset": DIGITS,
                    "temperature": args.temperature,
                    "alpha": args.alpha,
                    "training": {"epochs": args.epochs, "lr": 3e-3},
                    "baseline": True,
                }
                r = run_step("distill", spec, use_cache=False, quiet=True)
                rows.append((width, seed, r))
                print(
                    f"width {width} seed {seed}: KD {r.student_accuracy:.4f}, baseline {r.baseline_accuracy:.4f} "
                    f"({r.metrics['step_seconds']:.1f} s)",
                    file=sys.stderr,
                )

    report = render(rows, teacher_params, args)
    print(report)
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(report)


def render(rows, teacher_params: int, args) -> str:
    lines = [
        "| student width | params (ratio) | seed | teacher acc | student KD acc | baseline acc | KD / teacher | KD − baseline |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for width, seed, r in rows:
        lines.append(
            f"| {width} | {r.student_params} ({r.params_ratio:.1%}) | {seed} | {r.teacher_accuracy:.4f} | "
            f"{r.student_accuracy:.4f} | {r.baseline_accuracy:.4f} | {r.accuracy_ratio:.3f} | {r.accuracy_gain:+.4f} |"
        )
    summary = [
        "| student width | params ratio | mean KD / teacher | min KD / teacher | mean baseline / teacher | mean KD − baseline |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for width in dict.fromkeys(w for w, _, _ in rows):
        rs = [r for w, _, r in rows if w == width]
        summary.append(
            f"| {width} | {rs[0].params_ratio:.1%} | {statistics.mean(r.accuracy_ratio for r in rs):.3f} | "
            f"{min(r.accuracy_ratio for r in rs):.3f} | "
            f"{statistics.mean(r.baseline_accuracy / r.teacher_accuracy for r in rs):.3f} | "
            f"{statistics.mean(r.accuracy_gain for r in rs):+.4f} |"
        )
    return "\n".join(
        [
            "# Distillation on scikit-learn digits",
            "",
            f"Machine: {machine()}.",
            f"Command: `python benchmarks/bench_distill.py --epochs {args.epochs} --seeds {' '.join(map(str, args.seeds))} "
            f"--widths {' '.join(map(str, args.widths))}`.",
            "",
            f"Teacher: `digits_cnn` width 1.0, {teacher_params} parameters, trained {args.epochs} epochs (AdamW, lr 2e-3, cosine). "
            f"Students: the `distill` step, {args.epochs} epochs, AdamW lr 3e-3, cosine, batch 64, "
            f"T = {args.temperature}, alpha = {args.alpha}; baseline = the same student and seed with alpha = 0. "
            "Accuracy is top-1 on the 360-image test split (never trained or early-stopped on); "
            "each run keeps the weights of its best validation epoch.",
            "",
            "## Summary",
            "",
            *summary,
            "",
            "## Every run",
            "",
            *lines,
            "",
        ]
    )


if __name__ == "__main__":
    main()
