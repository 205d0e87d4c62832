"""Convert MobileNetV2 and ResNet-18 (224x224) to MNN and compare runtimes, sizes and fidelity.

    python benchmarks/bench_convert.py [--warmup 10] [--iterations 30] [--out benchmarks/results/convert.md]

For each architecture (random weights: fine for latency and size, not for accuracy):
  * the convert step makes three verified .mnn files from a state-dict + factory: fp32, fp16
    weight storage, 8-bit weight-only quantization (each checked against torch before it is
    published; the fp16/int8 runs carry a looser tolerance, stated below);
  * the benchmark step times torch eager fp32, ONNX Runtime fp32 and the three .mnn files at
    batch 1 with 1 and 2 threads, each model in its own process, and compares every output
    with torch's on the same random inputs.
Printed and written: median latency and its ratio to torch at the same thread count; size on
disk, its ratio to the fp32 .mnn and to the bound (parameters x bits / 8); fidelity vs torch.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mnnpipe.models import count_params, mobilenet_v2, resnet18
from mnnpipe.report import machine_info, markdown_table
from mnnpipe.runner import run_step

ARCHS = {"MobileNetV2": ("mnnpipe.models:mobilenet_v2", mobilenet_v2), "ResNet-18": ("mnnpipe.models:resnet18", resnet18)}
# label -> (weights options, bits per weight, tolerance). Random weights give near-tied logits
# over 1000 classes, so argmax flips under any weight rounding: top-1 agreement is not checked
# for the lossy variants here (cosine is); with trained weights, check it.
VARIANTS = {
    "mnn-fp32": ({}, 32, {}),
    "mnn-fp16": ({"fp16": True}, 16, {"max_abs_error": None, "min_cosine": 0.999, "min_top1_agreement": 0.0}),
    "mnn-w8": ({"bits": 8}, 8, {"max_abs_error": None, "min_cosine": 0.999, "min_top1_agreement": 0.0}),
}
SHAPE = [1, 3, 224, 224]


def load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def bench_arch(name: str, factory: str, build, work: Path, warmup: int, iterations: int) -> list[dict]:
    torch.manual_seed(0)
    model = build().eval()
    params = count_params(model)
    sd = work / f"{name}.pth"
    torch.save(model.state_dict(), sd)
    src = {"uri": str(sd), "format": "state-dict", "factory": factory}
    inputs = [{"name": "input", "shape": SHAPE}]
    converted = {}
    for label, (weights, _, tol) in VARIANTS.items():
        t0 = time.perf_counter()
        res = run_step(
            "convert",
            {"model": src, "inputs": inputs, "weights": weights, "tolerance": tol, "num_samples": 4, "output": str(work / name / label)},
            use_cache=False,
            quiet=True,
        )
        converted[label] = res
        print(f"  converted {name} {label}: {res.mnn_bytes:,} B, cosine {res.fidelity.cosine:.6f} ({time.perf_counter() - t0:.1f} s)", flush=True)
    models = [
        {"label": "torch-fp32", "model": src},
        {"label": "onnxruntime-fp32", "model": {"uri": str(work / name / "mnn-fp32" / "model.onnx")}},
        *[{"label": label, "model": {"uri": str(work / name / label / "model.mnn")}} for label in VARIANTS],
    ]
    bench = run_step(
        "benchmark",
        {
            "models": models,
            "inputs": inputs,
            "threads": [1, 2],
            "batch_sizes": [1],
            "warmup": warmup,
            "iterations": iterations,
            "reference": "torch-fp32",
            "num_samples": 4,
            "output": str(work / name / "bench"),
        },
        use_cache=False,
        quiet=True,
    )
    by_label = {s.label: s for s in bench.models}
    fp32_mnn = by_label["mnn-fp32"].size_bytes
    bits = {"torch-fp32": 32, "onnxruntime-fp32": 32, **{k: v[1] for k, v in VARIANTS.items()}}
    rows = []
    for r in bench.rows:
        torch_p50 = next(x.p50_ms for x in bench.rows if x.label == "torch-fp32" and x.threads == r.threads)
        s = by_label[r.label]
        bound = params * bits[r.label] / 8
        rows.append(
            {
                "model": name,
                "variant": r.label,
                "threads": r.threads,
                "p50 ms": r.p50_ms,
                "p50 / torch": r.p50_ms / torch_p50,
                "p90 ms": r.p90_ms,
                "size MB": s.size_bytes / 1e6,
                "size / mnn-fp32": s.size_bytes / fp32_mnn,
                "size / bound": s.size_bytes / bound,
                "peak RSS Δ MB": s.peak_rss_delta_bytes / 2**20,
                "cosine vs torch": s.fidelity.cosine if s.fidelity else None,
                "max abs err vs torch": s.fidelity.max_abs_error if s.fidelity else None,
                "top-1 agree": s.fidelity.top1_agreement if s.fidelity else None,
            }
        )
    print(f"  benchmarked {name}: {params:,} parameters", flush=True)
    return rows, params


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "convert.md"))
    args = ap.parse_args()
    machine = machine_info()
    load_before = load_average()
    t0 = time.perf_counter()
    rows, params = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        os.environ["MNNPIPE_CACHE_URI"] = str(Path(tmp) / "cache")
        for name, (factory, build) in ARCHS.items():
            print(f"{name}:", flush=True)
            arch_rows, n = bench_arch(name, factory, build, Path(tmp), args.warmup, args.iterations)
            rows += arch_rows
            params[name] = n
    elapsed = time.perf_counter() - t0
    table = markdown_table(rows)
    print()
    print(table)
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if sys.platform.startswith("linux") else ""
    model_name = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), machine["cpu"])
    import MNN  # noqa: F401  (only for its version below; never MNN.tools)
    from importlib.metadata import version

    text = f"""# Convert: torch vs ONNX Runtime vs MNN (fp32, fp16 storage, 8-bit weights)

Produced by `python benchmarks/bench_convert.py --warmup {args.warmup} --iterations {args.iterations}` in {elapsed:.0f} s.

- Machine: `lscpu` model name **{model_name}**, **{machine['cores']} cores** available, {machine['system']}.
- Versions: torch {version('torch')}, onnxruntime {version('onnxruntime')}, MNN {version('MNN')}.
- Load average (1/5/15 min): {load_before} before, {load_average()} after. On a shared 2-core
  machine anything above ~1 makes absolute latencies noisy, the 2-thread rows especially; the
  ratios within a row group are measured side by side and hold up better.
- Inputs: 1x3x224x224 random values in [0, 1), batch 1; {args.warmup} warm-up + {args.iterations} timed runs per
  setting, each model in its own process (torch `set_num_threads`, ORT `intra_op_num_threads`,
  MNN `numThread`). Random weights (seed 0): valid for latency, size and fidelity, not accuracy.
- Parameters: {", ".join(f"{k} {v:,}" for k, v in params.items())}. The size bound is parameters x bits / 8
  (32 for fp32, 16 for fp16, 8 for 8-bit weights); BatchNorm is folded into convolutions by the
  exporter, so a converted file can come in under the bound.
- Fidelity: every output of the model compared with torch eager on 4 random inputs in the
  benchmark step (the convert step verified the same before publishing each .mnn).
- Peak RSS Δ: peak resident set size of the measuring process while loading and timing the
  model, minus its RSS after importing the runtime.
- fp16 and 8-bit weight storage are converted back to float when MNN loads the model: they
  shrink the file, not the latency (see /work/shared/notes/mnn.md).

{table}"""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
