"""Pruning for MNN: structured channel pruning (+ full int8) and what MNN does with sparse weights.

    python benchmarks/bench_prune.py [--iters 15] [--calib 8] [--out benchmarks/results/prune.md]

Part 1: MobileNetV2 and ResNet-18 (random weights, 224x224, batch 1), 0 / 30 / 50 % of channels
removed by the prune step (L1, uniform, channel counts rounded to multiples of 8), each converted
to fp32 .mnn and quantized to full int8 (weights and activations, `engines.mnn.quantize_int8`,
EMA calibration on a few synthetic images). Params and MACs from Torch-Pruning's counter, sizes
from bytes on disk, latency the median of timed runs after warm-up with 1 thread.

Part 2: ResNet-18 with 0 / 50 / 90 % of conv/linear weights zeroed by the prune step's
unstructured mode, converted fp32 and with --weightQuantBits 8, each with and without the
converter's --detectSparseSpeedUp flag (the only sparse option in MNN 3.6.1's converter).

Random weights are fine for size and speed; they say nothing about accuracy (see the tests for
accuracy recovery on digits).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mnnpipe.calibration import write_calibration
from mnnpipe.data import Dataset
from mnnpipe.engines import mnn as E
from mnnpipe.engines.onnx_export import export_onnx
from mnnpipe.runner import run_step
from mnnpipe.specs import Preprocess

SHAPE = (1, 3, 224, 224)
MODELS = {"MobileNetV2": ("mobilenet_v2", {"num_classes": 1000, "width": 1.0}), "ResNet-18": ("resnet18", {"num_classes": 1000, "width": 1.0})}


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def latency_ms(mnn_path: Path, iters: int) -> float:
    session = E.load_session(mnn_path, threads=1)
    x = np.random.default_rng(0).random(SHAPE, dtype=np.float32)
    for _ in range(3):
        session.run([x])
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        session.run([x])
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def to_mnn(model_pt: str, work: Path, name: str, sparse: bool = False, bits: int | None = None) -> Path:
    """TorchScript -> ONNX -> .mnn, optionally with the converter's sparse weight storage."""
    onnx_path = work / f"{name}.onnx"
    if not onnx_path.exists():
        export_onnx(torch.jit.load(model_pt), (torch.rand(*SHAPE),), onnx_path, input_names=["input"], dynamic_batch=False)
    dst = work / f"{name}{'-w' + str(bits) if bits else ''}{'-sparse' if sparse else ''}.mnn"
    E.convert_onnx_to_mnn(onnx_path, dst, weight_quant_bits=bits, detect_sparse=sparse)
    return dst


def calibration(work: Path, n: int) -> dict:
    g = torch.Generator().manual_seed(0)
    low = torch.rand(n, 3, 14, 14, generator=g)  # smooth random fields, closer to photos than noise
    x = torch.nn.functional.interpolate(low, size=SHAPE[2:], mode="bilinear", align_corners=False).numpy()
    calib = write_calibration(
        Dataset(x.astype(np.float32), None, ()), work / "calib", Preprocess(), input_name="input", input_shape=SHAPE, limit=n
    )
    return {**calib.config, "feature_quantize_method": "EMA", "weight_quantize_method": "MAX_ABS"}


def prune(work: Path, factory: str, kwargs: dict, **options) -> object:
    weights = work / f"{factory}.pth"
    if not weights.exists():
        torch.manual_seed(0)
        torch.save(__import__("mnnpipe.models", fromlist=[factory]).__dict__[factory](**kwargs).state_dict(), weights)
    tag = "-".join(f"{k}{v}" for k, v in sorted(options.items()) if k != "target")
    spec = {
        "output": str(work / f"{factory}-{tag}-{options.get('target', {}).get('ratio', 0)}"),
        "model": {"uri": str(weights), "factory": f"mnnpipe.models:{factory}", "factory_kwargs": kwargs},
        "input": {"shape": list(SHAPE)},
        "export_pt2": False,
        **options,
    }
    return run_step("prune", spec, use_cache=False, quiet=True)


def structured(work: Path, iters: int, n_calib: int) -> list[str]:
    quant_cfg = calibration(work, n_calib)
    rows = [
        "| model | channels removed | params | MACs | params ratio | MACs ratio | fp32 .mnn MB | fp32 ms | int8 .mnn MB | int8 ms "
        "| int8 / unpruned-fp32 size | bound params x 1 B, MB | int8 / unpruned-int8 latency |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, (factory, kwargs) in MODELS.items():
        base = None
        for ratio in (0.0, 0.3, 0.5):
            t0 = time.perf_counter()
            if ratio == 0:
                # a 1e-6 share removes no channel but runs the same path (trace, count, save)
                r = prune(work, factory, kwargs, target={"ratio": 1e-6}, round_to=8)
            else:
                r = prune(work, factory, kwargs, target={"ratio": ratio}, round_to=8)
            name = f"{factory}-{int(ratio * 100)}"
            fp32 = to_mnn(r.artifacts["model.pt"].uri, work, name)
            int8 = work / f"{name}-int8.mnn"
            E.quantize_int8(fp32, int8, quant_cfg)
            row = {
                "params": r.params_after, "macs": r.macs_after, "fp32_mb": fp32.stat().st_size / 1e6,
                "int8_mb": int8.stat().st_size / 1e6, "fp32_ms": latency_ms(fp32, iters), "int8_ms": latency_ms(int8, iters),
            }  # fmt: skip
            base = base or row
            rows.append(
                f"| {label} | {ratio:.0%} | {row['params']:,} | {row['macs'] / 1e6:,.0f} M | {row['params'] / base['params']:.3f} "
                f"| {row['macs'] / base['macs']:.3f} | {row['fp32_mb']:.2f} | {row['fp32_ms']:.1f} | {row['int8_mb']:.2f} "
                f"| {row['int8_ms']:.1f} | {row['int8_mb'] / base['fp32_mb']:.3f} | {row['params'] / 1e6:.2f} "
                f"| {row['int8_ms'] / base['int8_ms']:.2f} |"
            )
            print(rows[-1], f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


def unstructured(work: Path, iters: int) -> list[str]:
    rows = [
        "| ResNet-18 sparsity (counted) | fp32 MB | fp32 + detectSparseSpeedUp MB | w8 MB | w8 + detectSparseSpeedUp MB "
        "| fp32 ms | fp32 sparse-flag ms | w8 ms | w8 sparse-flag ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    factory, kwargs = MODELS["ResNet-18"]
    for sparsity in (0.0, 0.5, 0.9):
        t0 = time.perf_counter()
        if sparsity == 0:
            r = prune(work, factory, kwargs, target={"ratio": 1e-6})
        else:
            r = prune(work, factory, kwargs, method="unstructured", sparsity=sparsity)
        name = f"resnet18-sparse{int(sparsity * 100)}"
        files = [
            to_mnn(r.artifacts["model.pt"].uri, work, name),
            to_mnn(r.artifacts["model.pt"].uri, work, name, sparse=True),
            to_mnn(r.artifacts["model.pt"].uri, work, name, bits=8),
            to_mnn(r.artifacts["model.pt"].uri, work, name, sparse=True, bits=8),
        ]
        sizes = " | ".join(f"{f.stat().st_size / 1e6:.2f}" for f in files)
        times = " | ".join(f"{latency_ms(f, iters):.1f}" for f in files)
        rows.append(f"| {r.sparsity:.3f} | {sizes} | {times} |")
        print(rows[-1], f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=15, help="timed runs per model (after 3 warm-up runs)")
    parser.add_argument("--calib", type=int, default=8, help="synthetic calibration images for int8")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables to this Markdown file")
    parser.add_argument("--part", choices=("all", "structured", "unstructured"), default="all")
    args = parser.parse_args()
    torch.set_num_threads(1)
    header = [f"Machine: {cpu_model()}, {torch.get_num_threads()} torch thread(s); MNN 1 thread; iters {args.iters}", ""]
    with tempfile.TemporaryDirectory(prefix="bench-prune-") as tmp:
        work = Path(tmp)
        lines = header
        if args.part in ("all", "structured"):
            lines += ["## Structured (L1, uniform, round_to 8) + full int8 (EMA)", "", *structured(work, args.iters, args.calib), ""]
        if args.part in ("all", "unstructured"):
            lines += ["## Unstructured (global magnitude) in MNN", "", *unstructured(work, args.iters), ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
