"""Time and peak memory of `mnnpipe run convert` and `mnnpipe run quantize` against parameter count.

    python benchmarks/bench_scaling.py [--widths 0.25 0.5 0.71 1.0] [--out benchmarks/results/scaling.md]

Models: VGG19's layer layout (16 convs + 3 fully connected, 224x224 input) with every width scaled
by `width` (width 1.0 is VGG19 itself, 143.7 M parameters), random weights. For each width:

* `mnnpipe run convert` of the state-dict (+ factory) to a verified fp32 .mnn (2 samples);
* `mnnpipe run quantize` of that .mnn to full int8 (KL, 8 calibration images, 2 evaluation images);
* the bare quantizer: MNN's tool on the same .mnn, calibration folder and config, alone.

Each runs as its own process tree under `nice`, one at a time; peak memory is the largest sum of
RSS over the whole tree (the MNN tool children included), sampled every 20 ms (benchmarks/measure.py).
Targets (issue 17): convert and quantize peaks within 3x the fp32 weight bytes above a fixed
base, and `run quantize` within 1.3x of the bare quantizer's time. The base is fitted: the
intercept of a least-squares line of peak against weight bytes; the table shows the slope.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from measure import machine, run_tree  # noqa: E402

VGG19_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


class VGG(nn.Module):
    """VGG19 (Simonyan & Zisserman 2014, configuration E) with all widths scaled by `width`."""

    def __init__(self, width: float = 1.0, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in VGG19_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                out = max(8, int(round(item * width)))
                layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU(inplace=True)]
                channels = out
        hidden = max(16, int(round(4096 * width)))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * 7 * 7, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes),
        )  # fmt: skip

    def forward(self, x):
        return self.classifier(self.features(x))


def vgg19(width: float = 1.0) -> VGG:
    torch.manual_seed(0)
    model = VGG(width).eval()
    with torch.no_grad():  # small weights: random VGGs at default init overflow float16-ish ranges in int8
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0, (2.0 / fan_in) ** 0.5)
                m.bias.zero_()
    return model


def _images(folder: Path, n: int, seed: int) -> None:
    from PIL import Image

    cls = folder / "any"
    cls.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        low = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
        Image.fromarray(low).resize((224, 224), Image.BILINEAR).save(cls / f"{i}.png")


def _cli(step: str, spec: dict, work: Path, env: dict) -> dict:
    spec_path = work / f"{step}.json"
    spec_path.write_text(json.dumps(spec))
    cmd = ["nice", "-n", "5", sys.executable, "-m", "mnnpipe.cli", "run", step, "--spec", str(spec_path), "--no-cache"]
    r = run_tree(cmd, env=env)
    if r["returncode"] != 0:
        raise SystemExit(f"{step} failed ({r['returncode']}): {r['output']}")
    return r


def _bare_quantizer(fp32: Path, work: Path, data_dir: Path, n_calib: int, env: dict) -> dict:
    """MNN's quantizer alone, with the calibration folder and config the quantize step writes."""
    from mnnpipe.calibration import write_calibration
    from mnnpipe.data import load_dataset
    from mnnpipe.specs import DatasetRef

    ref = DatasetRef(format="image-folder", uri=str(data_dir), preprocess={"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
    calib = write_calibration(load_dataset(ref, data_dir), work / "bare-calib", ref.preprocess, input_name="input", input_shape=(1, 3, 224, 224), limit=n_calib)
    config = {**calib.config, "feature_quantize_method": "KL", "weight_quantize_method": "MAX_ABS", "skip_quant_op_names": []}
    cfg = work / "bare.json"
    cfg.write_text(json.dumps(config))
    worker = Path(__import__("mnnpipe.engines.mnn", fromlist=["_WORKER"])._WORKER)
    cmd = ["nice", "-n", "5", sys.executable, str(worker), "mnnquant", str(fp32), str(work / "bare-int8.mnn"), str(cfg)]
    r = run_tree(cmd, env=env, cwd=str(work))
    if r["returncode"] != 0:
        raise SystemExit(f"bare quantizer failed (exit status {r['returncode']}): {r['output']}")
    # MNN's tool exits 0 even when it could not write its output (seen once on VGG19 with
    # "open scale file ... fail"); the timing and memory of its work are still measured.
    r["wrote_model"] = (work / "bare-int8.mnn").is_file()
    return r


def bench_width(width: float, root: Path, n_calib: int, env: dict) -> dict:
    work = root / f"w{width}"
    work.mkdir(parents=True, exist_ok=True)
    model = vgg19(width)
    params = sum(p.numel() for p in model.parameters())
    sd = work / "vgg.pth"
    torch.save(model.state_dict(), sd)
    del model
    calib_dir, eval_dir = work / "calib-images", work / "eval-images"
    _images(calib_dir, n_calib, 1)
    _images(eval_dir, 2, 2)
    pre = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    convert = _cli(
        "convert",
        {"model": {"uri": str(sd), "format": "state-dict", "factory": "bench_scaling:vgg19", "factory_kwargs": {"width": width}},
         "inputs": [{"name": "input", "shape": [1, 3, 224, 224]}], "num_samples": 2, "output": str(work / "convert")},
        work, env,
    )  # fmt: skip
    fp32 = work / "convert" / "model.mnn"
    quantize = _cli(
        "quantize",
        {"model": {"uri": str(fp32)}, "calibration": {"format": "image-folder", "uri": str(calib_dir), "preprocess": pre},
         "evaluation": {"format": "image-folder", "uri": str(eval_dir), "preprocess": pre}, "calibration_samples": n_calib,
         "fidelity": {"max_abs_error": None, "min_cosine": 0.9, "min_top1_agreement": 0.0}, "output": str(work / "quantize")},
        work, env,
    )  # fmt: skip
    bare = _bare_quantizer(fp32, work, calib_dir, n_calib, env)
    row = {
        "width": width, "params": params, "weight_bytes": params * 4, "mnn_bytes": fp32.stat().st_size,
        "convert_s": convert["seconds"], "convert_peak": convert["peak_rss_bytes"],
        "quantize_s": quantize["seconds"], "quantize_peak": quantize["peak_rss_bytes"],
        "bare_s": bare["seconds"], "bare_peak": bare["peak_rss_bytes"], "bare_wrote_model": bare["wrote_model"],
        "convert_cpu_s": convert.get("cpu_seconds"), "quantize_cpu_s": quantize.get("cpu_seconds"), "bare_cpu_s": bare.get("cpu_seconds"),
    }  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def _fit(rows: list[dict], key: str) -> tuple[float, float]:
    """(slope in bytes per weight byte, intercept in bytes) of peak against fp32 weight bytes."""
    x = np.array([r["weight_bytes"] for r in rows], float)
    y = np.array([r[key] for r in rows], float)
    if len(rows) < 2:
        return float("nan"), float("nan")
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def report(rows: list[dict], command: str, load_before: str, seconds: float) -> str:
    mib = 2**20
    lines = [
        "# Scaling: `run convert` / `run quantize` time and peak memory against parameter count",
        "",
        f"Machine: {machine()} (at the end); load average at the start {load_before}.",
        f"Command: `{command}` ({seconds:.0f} s). torch {torch.__version__}.",
        "Models: VGG19 layout, every width scaled (width 1.0 = VGG19), random weights, 224x224, batch 1.",
        "convert: state-dict + factory -> verified fp32 .mnn (2 samples). quantize: that .mnn -> full int8, KL,",
        f"{rows[0].get('n_calib', 8)} calibration images, 2 evaluation images. bare: MNN's quantizer alone on the same .mnn, images and config.",
        "Peak: largest sum of RSS over the whole process tree (MNN tool children included), sampled every 20 ms.",
        "The machine has 2 cores shared with other work: times carry noise of 10-30%.",
        "",
        "| width | params (M) | fp32 weights (MiB) | convert s | convert peak (MiB) | quantize s | quantize peak (MiB) | bare quantizer s | bare peak (MiB) | quantize / bare time |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['width']} | {r['params'] / 1e6:.1f} | {r['weight_bytes'] / mib:.0f} | {r['convert_s']:.1f} | {r['convert_peak'] / mib:.0f} | "
            f"{r['quantize_s']:.1f} | {r['quantize_peak'] / mib:.0f} | {r['bare_s']:.1f} | {r['bare_peak'] / mib:.0f} | {r['quantize_s'] / r['bare_s']:.2f} |"
        )
    lines += ["", "## Against the targets", ""]
    for key, name in (("convert_peak", "convert"), ("quantize_peak", "quantize"), ("bare_peak", "bare quantizer")):
        slope, intercept = _fit(rows, key)
        top = rows[-1]
        above = (top[key] - intercept) / top["weight_bytes"]
        lines.append(
            f"- {name} peak: {slope:.2f} bytes per fp32 weight byte (least-squares slope), base {intercept / mib:.0f} MiB; "
            f"at {top['params'] / 1e6:.0f} M params {top[key] / mib:.0f} MiB = base + {above:.2f}x the weights "
            f"(target for convert/quantize: <= 3x)."
        )
    worst = max(rows, key=lambda r: r["quantize_s"] / r["bare_s"])
    ratios = ", ".join(f"{r['quantize_s'] / r['bare_s']:.2f}" for r in rows)
    lines.append(
        f"- `run quantize` / bare quantizer time: {ratios} "
        f"(worst {worst['quantize_s'] / worst['bare_s']:.2f} at width {worst['width']}; target <= 1.3)."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=float, nargs="+", default=[0.25, 0.5, 0.71, 1.0])
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "scaling.md")
    ap.add_argument("--rows", type=Path, help="Also write the raw rows as JSON here.")
    args = ap.parse_args()
    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="mnnpipe-scaling-") as tmp:
        for width in args.widths:
            rows.append({**bench_width(width, Path(tmp), args.calib, env), "n_calib": args.calib})
    if args.rows:
        args.rows.write_text(json.dumps(rows, indent=1))
    command = "python benchmarks/bench_scaling.py " + " ".join(sys.argv[1:])
    text = report(rows, command.strip(), load_before, time.perf_counter() - start)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
