"""`run convert` and `run quantize` on ResNet-18: time, CPU time and peak memory, for the code in
this checkout and, with --before DIR, for another copy of the mnnpipe package (e.g. the last commit).

    git archive HEAD mnnpipe | tar -x -C /tmp/before    # the package as last committed
    python benchmarks/bench_step_overhead.py --before /tmp/before [--out benchmarks/results/step-overhead.md]

ResNet-18 (mnnpipe.models, random weights) as state-dict + factory -> `run convert` (2 samples)
-> `run quantize` (full int8, KL, 8 calibration images, 2 evaluation images), then MNN's
quantizer alone on the same inputs. Process-tree peak memory and CPU time as in bench_scaling.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_scaling import _bare_quantizer, _images  # noqa: E402
from measure import machine, run_tree  # noqa: E402

from mnnpipe.models import count_params, resnet18  # noqa: E402

PRE = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _cli(step: str, spec: dict, work: Path, env: dict) -> dict:
    path = work / f"{step}.json"
    path.write_text(json.dumps(spec))
    r = run_tree(["nice", "-n", "5", sys.executable, "-m", "mnnpipe.cli", "run", step, "--spec", str(path), "--no-cache"], env=env, cwd=str(work))
    if r["returncode"] != 0:
        raise SystemExit(f"{step} failed: {r['output']}")
    return r


def measure_tree(pkg_parent: str | None, work: Path, sd: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if pkg_parent:
        env["PYTHONPATH"] = pkg_parent  # ahead of the installed (editable) package
    work.mkdir(parents=True)
    convert = _cli(
        "convert",
        {"model": {"uri": str(sd), "format": "state-dict", "factory": "mnnpipe.models:resnet18"},
         "inputs": [{"name": "input", "shape": [1, 3, 224, 224]}], "num_samples": 2, "output": str(work / "convert")},
        work, env,
    )  # fmt: skip
    quantize = _cli(
        "quantize",
        {"model": {"uri": str(work / "convert" / "model.mnn")}, "calibration": {"format": "image-folder", "uri": str(sd.parent / "calib"), "preprocess": PRE},
         "evaluation": {"format": "image-folder", "uri": str(sd.parent / "eval"), "preprocess": PRE}, "calibration_samples": 8,
         "fidelity": {"max_abs_error": None, "min_cosine": 0.9, "min_top1_agreement": 0.0}, "output": str(work / "quantize")},
        work, env,
    )  # fmt: skip
    bare = _bare_quantizer(work / "convert" / "model.mnn", work, sd.parent / "calib", 8, env)
    return {"convert": convert, "quantize": quantize, "bare": bare}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", help="Folder holding another copy of the mnnpipe package (its parent goes on PYTHONPATH).")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "step-overhead.md")
    args = ap.parse_args()
    load_start = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mnnpipe-overhead-") as tmp:
        d = Path(tmp)
        torch.manual_seed(0)
        model = resnet18().eval()
        params = count_params(model)
        torch.save(model.state_dict(), d / "resnet18.pth")
        _images(d / "calib", 8, 1)
        _images(d / "eval", 2, 2)
        runs = {}
        if args.before:
            runs["before"] = measure_tree(args.before, d / "before", d / "resnet18.pth")
        runs["after"] = measure_tree(None, d / "after", d / "resnet18.pth")
    mib = 2**20
    lines = [
        "# `run convert` / `run quantize` on ResNet-18: before and after issue 17's fixes",
        "",
        f"Machine: {machine()} (at the end); load average at the start {load_start}.",
        f"Command: `python benchmarks/bench_step_overhead.py {' '.join(sys.argv[1:])}` ({time.perf_counter() - start:.0f} s);"
        " 'before' = `git archive HEAD mnnpipe` of commit d5d9606.",
        f"ResNet-18: {params / 1e6:.1f} M params, {params * 4 / mib:.0f} MiB of fp32 weights. CPU = user+system seconds of the whole"
        " process tree (steadier than wall time: the 2 cores were shared with other work).",
        "",
        "| code | command | wall s | CPU s | peak MiB | CPU / bare quantizer CPU |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for code, r in runs.items():
        for what in ("convert", "quantize", "bare"):
            x = r[what]
            ratio = f"{x['cpu_seconds'] / r['bare']['cpu_seconds']:.2f}" if what != "convert" else ""
            name = {"convert": "`run convert`", "quantize": "`run quantize`", "bare": "bare quantizer"}[what]
            lines.append(f"| {code} | {name} | {x['seconds']:.1f} | {x['cpu_seconds']:.1f} | {x['peak_rss_bytes'] / mib:.0f} | {ratio} |")
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
