"""MNN against the runtimes a user could deploy instead on this x86 CPU, each in its fast setting.

    python benchmarks/bench_peers.py [--iterations 30] [--out benchmarks/results/peers.md]
    MNNPIPE_MNN_BENCHMARK=/path/to/benchmark.out python benchmarks/bench_peers.py ...   # + MNN built from source

MobileNetV2 and ResNet-18 (mnnpipe.models, random weights), 224x224, batch 1, 1 and 2 threads,
through the benchmark step (each model in its own process, median of timed runs):

* MNN fp32 and MNN int8 (the PyPI wheel; int8 = MNN's quantizer, KL, MAX_ABS per channel);
* ONNX Runtime fp32, int8 with signed activations (S8S8, what quantize.md compared with) and the
  `onnxruntime-int8-u8s8` peer (unsigned activations: ONNX Runtime's fast x86 path);
* the `openvino-fp32` and `openvino-int8` peers (NNCF post-training quantization);
* with MNNPIPE_MNN_BENCHMARK set: MNN fp32 and int8 again through the source-built runtime
  (scripts/build-mnn.sh, AVX-512 + VNNI), timed by MNN's benchmark.out (avg of its runs).

All int8 models are calibrated on the same 16 synthetic images (upsampled random fields).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_quantize import MEAN, STD, export_onnx, mnn_int8, normalize, ort_int8, synthetic_images  # noqa: E402
from measure import machine  # noqa: E402

from mnnpipe.engines import mnn as E  # noqa: E402
from mnnpipe.engines.peers import PEERS  # noqa: E402
from mnnpipe.models import mobilenet_v2, resnet18  # noqa: E402
from mnnpipe.runner import run_step  # noqa: E402

ARCHS = {"mobilenet_v2": mobilenet_v2, "resnet18": resnet18}
SETTINGS = {
    "onnx-fp32": "ONNX Runtime 1.31.1 CPU, fp32, intra-op threads = column",
    "onnxruntime-int8-s8s8": "ONNX Runtime static int8: QDQ, activations QInt8 (signed), weights QInt8 per channel, MinMax "
    "(the setting benchmarks/results/quantize.md used)",
    "mnn-fp32": "MNN 3.6.1 PyPI wheel, fp32, precision normal",
    "mnn-int8": "MNN 3.6.1 PyPI wheel, int8 from MNN's quantizer (KL activations, MAX_ABS per-channel weights)",
    **PEERS,
}


def bench_arch(name: str, build, work: Path, n_calib: int, iterations: int, threads: list[int]):
    torch.manual_seed(0)
    d = work / name
    d.mkdir(parents=True)
    onnx_path = export_onnx(build().eval(), (1, 3, 224, 224), d / "fp32.onnx")
    E.convert_onnx_to_mnn(onnx_path, d / "fp32.mnn")
    images = synthetic_images(n_calib, 224)
    calib_dir = d / "calib"
    calib_dir.mkdir()
    from PIL import Image

    for i, img in enumerate(images):
        Image.fromarray(img).save(calib_dir / f"{i}.png")
    mnn_int8(d / "fp32.mnn", d / "int8.mnn", calib_dir, n_calib, 224)
    x = normalize(images)
    ort_int8(onnx_path, d / "s8s8.onnx", x)
    np.savez(d / "calib.npz", x=images)  # raw uint8 HWC images; the step normalises them like MNN's quantizer
    models = [
        {"label": "onnx-fp32", "model": {"uri": str(onnx_path)}},
        {"label": "onnxruntime-int8-s8s8", "model": {"uri": str(d / "s8s8.onnx")}},
        {"label": "mnn-fp32", "model": {"uri": str(d / "fp32.mnn")}},
        {"label": "mnn-int8", "model": {"uri": str(d / "int8.mnn")}},
    ]
    return run_step(
        "benchmark",
        {
            "models": models,
            "inputs": [{"name": "input", "shape": [1, 3, 224, 224], "range": [-2, 2]}],
            "threads": threads,
            "warmup": 5,
            "iterations": iterations,
            "reference": "onnx-fp32",
            "num_samples": 4,
            "peers": ["onnxruntime-int8-u8s8", "openvino-fp32", "openvino-int8"],
            "peer_source": "onnx-fp32",
            "peer_calibration": {"format": "npz", "uri": str(d / "calib.npz"), "preprocess": {"mean": list(MEAN), "std": list(STD)}},
            "peer_calibration_samples": n_calib,
            "output": str(d / "bench"),
        },
        use_cache=False,
        quiet=True,
    )


def report(results: dict, command: str, load_start: str, seconds: float, iterations: int) -> str:
    lines = [
        "# MNN against its x86 peers (ONNX Runtime, OpenVINO), each in its fast setting",
        "",
        f"Machine: {machine()} (at the end); load average at the start {load_start}.",
        f"Command: `{command}` ({seconds:.0f} s).",
        f"Latency: median ms of {iterations} timed runs after 5 warm-up runs, batch 1, 224x224, random weights and inputs,",
        "each model in its own process (the benchmark step). The machine's 2 cores were shared with other work: expect",
        "10-30% noise; ratios between runtimes measured back to back are steadier than absolute numbers.",
        "",
        "## Settings",
        "",
        *[f"- `{k}`: {v}." for k, v in SETTINGS.items()],
        "- int8 calibration for every engine: the same 16 synthetic images.",
        "",
        "## Latency (median ms)",
        "",
    ]
    labels = list(SETTINGS)
    lines.append("| model | threads | " + " | ".join(labels) + " | MNN int8 / ORT u8s8 | MNN int8 / OpenVINO int8 | MNN int8 / MNN fp32 |")
    lines.append("|---|---:|" + "---:|" * (len(labels) + 3))
    native_lines = []
    for arch, res in results.items():
        by = {(r.label, r.threads): r.p50_ms for r in res.rows}
        for t in sorted({r.threads for r in res.rows}):
            cells = [f"{by[(lab, t)]:.1f}" if (lab, t) in by else "—" for lab in labels]
            m8 = by.get(("mnn-int8", t))
            ratio = lambda other: f"{m8 / by[(other, t)]:.2f}" if m8 and (other, t) in by else "—"  # noqa: E731
            lines.append(f"| {arch} | {t} | " + " | ".join(cells) + f" | {ratio('onnxruntime-int8-u8s8')} | {ratio('openvino-int8')} | {ratio('mnn-fp32')} |")
        # benchmark.out prints only min/avg/max; one slow run (seen: 500 ms among 5 ms ones) skews
        # the avg, so the avg without the slowest run is shown and used for the ratios.
        nat = {(r.label, r.threads): r for r in res.mnn_source_built}
        trimmed = lambda r: (r.avg_ms * r.iterations - r.max_ms) / (r.iterations - 1)  # noqa: E731
        for t in sorted({t for _, t in nat}):
            f32, i8 = nat[("mnn-fp32", t)], nat[("mnn-int8", t)]
            ov8 = by.get(("openvino-int8", t))
            native_lines.append(
                f"| {arch} | {t} | {f32.min_ms:.1f} / {f32.avg_ms:.1f} / {trimmed(f32):.1f} | {i8.min_ms:.1f} / {i8.avg_ms:.1f} / {trimmed(i8):.1f} | "
                f"{trimmed(i8) / trimmed(f32):.2f} | {by.get(('mnn-fp32', t), float('nan')):.1f} | {by.get(('mnn-int8', t), float('nan')):.1f} | "
                f"{ov8:.1f} | {trimmed(i8) / ov8:.2f} |"
            )
    lines += ["", "## Fidelity (cosine vs ONNX Runtime fp32, 4 random inputs)", "", "| model | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for arch, res in results.items():
        cos = {s.label: (s.fidelity.cosine if s.fidelity else 1.0) for s in res.models}
        lines.append(f"| {arch} | " + " | ".join(f"{cos[lab]:.4f}" if lab in cos else "—" for lab in labels) + " |")
    lines += ["", "## MNN built from source for this CPU (scripts/build-mnn.sh: MNN_AVX512=ON, MNN_AVX512_VNNI=ON)", ""]
    if native_lines:
        tool = next(iter(results.values())).mnn_source_built[0].tool
        lines += [
            f"Tool: `{tool}` (MNN 3.6.1's benchmark.out, Session API, random inputs, precision normal, same thread counts,",
            "same warm-up and number of timed runs). It prints min / avg / max only: shown are min / avg / avg without the",
            "slowest run (ms); ratios use the last. The wheel and OpenVINO columns are medians from the benchmark step.",
            "",
            "| model | threads | source-built fp32 | source-built int8 | int8 / fp32 | wheel fp32 p50 | wheel int8 p50 | OpenVINO int8 p50 | source-built int8 / OpenVINO int8 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            *native_lines,
            "",
            "Expectation to test (issue 17): int8 faster than fp32, and within 1.5x of OpenVINO int8.",
        ]
    else:
        lines.append("Not measured in this run: MNNPIPE_MNN_BENCHMARK was not set (no source-built runtime available).")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--archs", nargs="+", default=list(ARCHS))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "peers.md")
    args = ap.parse_args()
    load_start = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    start = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="mnnpipe-peers-") as tmp:
        for arch in args.archs:
            results[arch] = bench_arch(arch, ARCHS[arch], Path(tmp), args.calib, args.iterations, args.threads)
            print(f"{arch}: done ({time.perf_counter() - start:.0f} s)", flush=True)
    command = ("MNNPIPE_MNN_BENCHMARK=... " if os.environ.get("MNNPIPE_MNN_BENCHMARK") else "") + "python benchmarks/bench_peers.py " + " ".join(sys.argv[1:])
    text = report(results, command.strip(), load_start, time.perf_counter() - start, args.iterations)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
