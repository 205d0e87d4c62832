"""Full-int8 quantization: MNN int8 vs MNN fp32 vs torch eager fp32 vs ONNX Runtime int8 (QDQ).

    python benchmarks/bench_quantize.py [--iters 30] [--calib 16] [--out benchmarks/results/quantize.md]

Latency: MobileNetV2 and ResNet-18 with random weights, 224x224, batch 1, 1 and 2 threads; median
of timed runs after warm-up. Calibration for both int8 engines: the same synthetic images
(smooth random fields), which is fine for latency, not for accuracy. Accuracy: a digits_cnn
trained here on scikit-learn digits, quantized by the quantize step (KL, MAX_ABS), measured on
the held-out test split. Also two small experiments the quantize docs rely on: does ADMM
activation calibration run, and does MNN's converter turn a QDQ ONNX model into int8 ops.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mnnpipe.verify import compare
import torch

from mnnpipe.engines import mnn as E
from mnnpipe.errors import ToolError
from mnnpipe.models import digits_cnn, mobilenet_v2, resnet18

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def synthetic_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, size, size, 3): upsampled random fields, closer to photos than white noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 14, 14, generator=g)
    img = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (img.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def normalize(images: np.ndarray) -> np.ndarray:
    x = images.astype(np.float32) / 255.0
    return ((x - np.array(MEAN, np.float32)) / np.array(STD, np.float32)).transpose(0, 3, 1, 2).copy()


def export_onnx(model: torch.nn.Module, shape: tuple[int, ...], path: Path) -> Path:
    torch.onnx.export(model.eval(), (torch.rand(*shape),), str(path), dynamo=False, input_names=["input"], output_names=["output"])
    return path


def time_it(fn, iters: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def mnn_int8(fp32: Path, dst: Path, calib_dir: Path, n: int, size: int, method: str = "KL") -> Path:
    config = {
        "format": "RGB",
        "mean": [m * 255 for m in MEAN],
        "normal": [1 / (s * 255) for s in STD],
        "width": size,
        "height": size,
        "path": str(calib_dir),
        "used_image_num": n,
        "feature_quantize_method": method,
        "weight_quantize_method": "MAX_ABS",
    }
    E.quantize_int8(fp32, dst, config)
    return dst


def ort_int8(onnx_path: Path, dst: Path, calib: np.ndarray) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"input": x[None]} for x in calib])

        def get_next(self):
            return next(self.items, None)

    pre = dst.with_name(dst.stem + "-pre.onnx")
    quant_pre_process(str(onnx_path), str(pre))
    quantize_static(
        str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
    )
    return dst


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def bench_model(name: str, factory, tmp: Path, iters: int, n_calib: int) -> list[dict]:
    size = 224
    torch.manual_seed(0)
    model = factory(num_classes=1000).eval()
    d = tmp / name
    d.mkdir()
    onnx_path = export_onnx(model, (1, 3, size, size), d / "fp32.onnx")
    fp32 = d / "fp32.mnn"
    E.convert_onnx_to_mnn(onnx_path, fp32)
    images = synthetic_images(n_calib, size)
    calib_dir = d / "calib"
    calib_dir.mkdir()
    from PIL import Image

    for i, img in enumerate(images):
        Image.fromarray(img).save(calib_dir / f"{i:04d}.png")
    t0 = time.perf_counter()
    int8 = mnn_int8(fp32, d / "int8.mnn", calib_dir, n_calib, size)
    mnn_quant_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ort_q = ort_int8(onnx_path, d / "int8-qdq.onnx", normalize(images))
    ort_quant_s = time.perf_counter() - t0
    x = normalize(synthetic_images(1, size, seed=99))
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.no_grad():
            xt = torch.from_numpy(x)
            t_torch = time_it(lambda: model(xt), iters)
        s32, s8 = E.load_session(fp32, threads=threads), E.load_session(int8, threads=threads)
        t_mnn32 = time_it(lambda: s32.run([x]), iters)
        t_mnn8 = time_it(lambda: s8.run([x]), iters)
        ort_s = ort_session(ort_q, threads)
        t_ort8 = time_it(lambda: ort_s.run(None, {"input": x}), iters)
        ref, out8 = s32.run([x])[0], s8.run([x])[0]
        # Random-weight logits can sit below int8 resolution (all zeros): cosine is then undefined.
        cos = compare([ref], [out8]).cosine if np.linalg.norm(out8) > 0 else float("nan")
        rows.append(
            dict(model=name, threads=threads, torch_fp32=t_torch, mnn_fp32=t_mnn32, mnn_int8=t_mnn8, ort_int8=t_ort8, cosine=cos)
        )
    sizes = dict(
        model=name,
        onnx_fp32=onnx_path.stat().st_size,
        mnn_fp32=fp32.stat().st_size,
        mnn_int8=int8.stat().st_size,
        ort_int8=ort_q.stat().st_size,
        int8_convs=E.op_types(int8).get("Convolution[int8]", 0),
        mnn_quant_s=mnn_quant_s,
        ort_quant_s=ort_quant_s,
    )
    admm = "not tried"
    if name == "mobilenet_v2":
        try:
            mnn_int8(fp32, d / "admm.mnn", calib_dir, min(4, n_calib), size, method="ADMM")
            admm = "ran"
        except ToolError as e:
            admm = f"ToolError: {str(e)[:90]}"
    return [dict(rows=rows, sizes=sizes, admm=admm)]


def digits_accuracy(tmp: Path) -> dict:
    """Train a digits_cnn briefly, quantize with the quantize step, report accuracy and QDQ findings."""
    from mnnpipe.data import load_dataset
    from mnnpipe.runner import run_step
    from mnnpipe.specs import DatasetRef
    from mnnpipe.train import FitConfig, accuracy, fit

    gray = {"channels": "GRAY"}
    train = load_dataset(DatasetRef(format="sklearn-digits", split="train", preprocess=gray))
    test = load_dataset(DatasetRef(format="sklearn-digits", split="test", preprocess=gray))
    model = digits_cnn()
    fit(model, train, FitConfig(epochs=8, lr=3e-3, seed=0))
    torch_acc = accuracy(model, test)
    d = tmp / "digits"
    d.mkdir()
    onnx_path = export_onnx(model, (1, 1, 8, 8), d / "fp32.onnx")
    fp32 = d / "fp32.mnn"
    E.convert_onnx_to_mnn(onnx_path, fp32)
    result = run_step(
        "quantize",
        {
            "model": {"uri": str(fp32)},
            "calibration": {"format": "sklearn-digits", "split": "train", "limit": 200, "preprocess": gray},
            "evaluation": {"format": "sklearn-digits", "split": "test", "preprocess": gray},
            "max_accuracy_drop": 100,
            "output": str(d / "out"),
        },
        use_cache=False,
        quiet=True,
    )
    # QDQ experiment: would MNN accept a QAT-style (fake-quant) ONNX model and make int8 ops of it?
    qdq = ort_int8(onnx_path, d / "qdq.onnx", train.x[:200].astype(np.float32))
    qdq_mnn = d / "qdq.mnn"
    qdq_note: str
    try:
        E.convert_onnx_to_mnn(qdq, qdq_mnn)
        ops = E.op_types(qdq_mnn)
        s = E.load_session(qdq_mnn)
        pred = np.array([s.run([x[None]])[0].argmax() for x in test.x])
        qdq_note = f"converted; op types {json.dumps(ops, sort_keys=True)}; accuracy {float((pred == test.y).mean()):.4f}; size {qdq_mnn.stat().st_size} B"
    except Exception as e:  # noqa: BLE001 - the experiment reports whatever happened
        qdq_note = f"failed: {type(e).__name__}: {str(e)[:160]}"
    return dict(
        torch_acc=torch_acc,
        fp32_acc=result.fp32.accuracy,
        int8_acc=result.quantized.accuracy,
        drop_pp=result.quantized.accuracy_drop_pp,
        size_ratio=result.size_ratio,
        cosine=result.quantized.cosine,
        samples=len(test),
        qdq=qdq_note,
    )


def report(models: list[dict], digits: dict, iters: int, n_calib: int, seconds: float) -> str:
    lines = [
        "# quantize: MNN full int8 vs fp32, torch eager and ONNX Runtime int8",
        "",
        f"Machine: {cpu_model()}, 2 cores (`lscpu`); Python {platform.python_version()}, torch {torch.__version__}, "
        f"MNN {_version('MNN')}, onnxruntime {_version('onnxruntime')}.",
        f"Command: `python benchmarks/bench_quantize.py --iters {iters} --calib {n_calib}` ({seconds:.0f} s).",
        "Latency: median ms of timed runs after 5 warm-up runs, batch 1, 224x224, random weights;",
        f"int8 calibration on {n_calib} synthetic images (MNN: KL, MAX_ABS per-channel; ORT: QDQ static, per-channel, MinMax).",
        "",
        "## Latency (ms, lower is better)",
        "",
        "| model | threads | torch fp32 | MNN fp32 | MNN int8 | ORT int8 | MNN int8 / torch | MNN int8 / MNN fp32 | MNN int8 / ORT int8 | int8 cosine vs fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in models:
        for r in m["rows"]:
            lines.append(
                f"| {r['model']} | {r['threads']} | {r['torch_fp32']:.1f} | {r['mnn_fp32']:.1f} | {r['mnn_int8']:.1f} | "
                f"{r['ort_int8']:.1f} | {r['mnn_int8'] / r['torch_fp32']:.2f} | {r['mnn_int8'] / r['mnn_fp32']:.2f} | "
                f"{r['mnn_int8'] / r['ort_int8']:.2f} | {'n/a (int8 output all zeros)' if np.isnan(r['cosine']) else format(r['cosine'], '.5f')} |"
            )
    lines += [
        "",
        "## Size (bytes on disk)",
        "",
        "| model | MNN fp32 | MNN int8 | int8 / fp32 | ORT int8 (QDQ) | ORT int8 / ONNX fp32 | int8 convs | MNN quant s | ORT quant s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in models:
        s = m["sizes"]
        lines.append(
            f"| {s['model']} | {s['mnn_fp32']:,} | {s['mnn_int8']:,} | {s['mnn_int8'] / s['mnn_fp32']:.3f} | {s['ort_int8']:,} | "
            f"{s['ort_int8'] / s['onnx_fp32']:.3f} | {s['int8_convs']} | {s['mnn_quant_s']:.1f} | {s['ort_quant_s']:.1f} |"
        )
    lines += [
        "",
        "## Accuracy (digits_cnn, 8 epochs on sklearn digits, quantize step, KL)",
        "",
        f"Held-out test split: {digits['samples']} images. torch fp32 {digits['torch_acc']:.4f}; MNN fp32 {digits['fp32_acc']:.4f}; "
        f"MNN int8 {digits['int8_acc']:.4f}; drop {digits['drop_pp']:.2f} pp; output cosine {digits['cosine']:.6f}; "
        f"size ratio {digits['size_ratio']:.3f}.",
        "",
        "## Experiments",
        "",
        f"- ADMM activation calibration on MobileNetV2: {next((m['admm'] for m in models if m['admm'] != 'not tried'), 'not run')}",
        f"- QDQ ONNX (ORT quantize_static of the digits model) through MNN's converter: {digits['qdq']}",
    ]
    return "\n".join(lines) + "\n"


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None, help="also write the Markdown table here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        models = []
        for name, factory in (("mobilenet_v2", mobilenet_v2), ("resnet18", resnet18)):
            models += bench_model(name, factory, Path(tmp), args.iters, args.calib)
            print(f"{name}: done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        digits = digits_accuracy(Path(tmp))
    text = report(models, digits, args.iters, args.calib, time.perf_counter() - t0)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
