"""Models nobody on the project wrote: convert / weight-only int8 / full int8, fidelity, size, and why it fails.

    python benchmarks/bench_models.py [--out benchmarks/results/models.md] [--only NAME ...] [--skip-int8]

Models:
  * the onnx package's light architectures (onnx/backend/test/data/light: ResNet-50, DenseNet-121,
    Inception v1/v2, ShuffleNet, SqueezeNet, VGG-19, AlexNet, ZFNet-512). They ship with every weight
    replaced by a ConstantOfShape; here each gets seeded, variance-preserving random values
    (He-normal for conv weights, N(0, 0.01) for the classifier's Gemm, BatchNorm scale/variance
    U(0.5, 1.5), everything else N(0, 0.05)), so fidelity is meaningful, accuracy is not. Where
    the final softmax still saturates, "max abs err" near 0 says little; top-1 agreement still does;
  * torch models the tests build: the 2-input transformer encoder (mnnpipe.models:text_encoder),
    and ONNX files of the kinds issue 16 names (opset 6, float64 input, 220,000-sample 1-D input,
    a dilated MaxPool2d that MNN gets wrong).

Per model, all through run_step (what `mnnpipe run` does):
  convert     fp32 .mnn, verified against the source (default tolerance);
  weight-only convert with 8-bit weights (tolerance: cosine >= 0.999, top-1 >= 0.95);
  full-int8   quantize the fp32 .mnn, KL, 16 calibration images (smooth random uint8 images),
              checked on 16 other images against the fp32 model (cosine >= 0.99, top-1 >= 0.95);
              image models only.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

LIGHT = ["squeezenet", "shufflenet", "resnet50", "inception_v1", "inception_v2", "densenet121", "bvlc_alexnet", "zfnet512", "vgg19"]
WEIGHT_ONLY_TOL = {"max_abs_error": None, "min_cosine": 0.999, "min_top1_agreement": 0.95}


def materialise_light(name: str, dst: Path) -> tuple[Path, list[dict]]:
    """The light model with seeded random weights in place of its ConstantOfShape placeholders."""
    import onnx
    from onnx import numpy_helper

    src = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"
    model = onnx.load(str(src))
    rng = np.random.default_rng(0)
    inits = {i.name: i for i in model.graph.initializer}
    role = {}
    for node in model.graph.node:
        for k, inp in enumerate(node.input):
            role.setdefault(inp, (node.op_type, k))
    keep, new = [], []
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in inits:
            shape = tuple(int(d) for d in numpy_helper.to_array(inits[node.input[0]]))
            out = node.output[0]
            op, k = role.get(out, ("", -1))
            if op == "Gemm" and k == 1:  # the classifier: small, as torchvision initialises it, so the softmax does not saturate
                a = rng.normal(0, 0.01, shape)
            elif op in ("Conv", "MatMul") and k == 1:
                fan_in = int(np.prod(shape[1:])) if op == "Conv" else shape[0]
                a = rng.normal(0, np.sqrt(2.0 / max(fan_in, 1)), shape)
            elif op == "BatchNormalization" and k in (1, 4):
                a = rng.uniform(0.5, 1.5, shape)
            else:
                a = rng.normal(0, 0.05, shape)
            new.append(numpy_helper.from_array(a.astype(np.float32), out))
        else:
            keep.append(node)
    used = {i for n in keep for i in n.input}
    del model.graph.node[:]
    model.graph.node.extend(keep)
    kept_inits = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept_inits + new)
    names = {i.name for i in model.graph.initializer}
    data_inputs = [i for i in model.graph.input if i.name not in names and i.name in used]
    del model.graph.input[:]
    model.graph.input.extend(data_inputs)
    model.ir_version = max(model.ir_version, 4)  # initializers no longer listed as inputs
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    inputs = []
    for i in data_inputs:
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in i.type.tensor_type.shape.dim]
        inputs.append({"name": i.name, "shape": dims})
    return dst, inputs


def smooth_images(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """uint8 (n, h, w, 3) images: upsampled low-resolution noise, so neighbouring pixels correlate."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (n, max(h // 16, 1), max(w // 16, 1), 3)).astype(np.float32)
    img = np.repeat(np.repeat(low, 16, axis=1), 16, axis=2)[:, :h, :w]
    return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)


def short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:260]}{'...' if len(text) > 260 else ''}"


def run_model(name: str, ref: dict, inputs: list[dict], work: Path, skip_int8: bool) -> dict:
    from mnnpipe.runner import run_step

    row = {"model": name, "inputs": ", ".join(f"{t['name']} {t['shape']}{' ' + t['dtype'] if 'dtype' in t else ''}" for t in inputs)}
    t0 = time.time()
    try:
        res = run_step("convert", {"model": ref, "inputs": inputs, "num_samples": 4, "output": str(work / "fp32")}, use_cache=False, quiet=True)
        row["convert"] = "ok"
        row["fp32 cosine / max abs err"] = f"{res.fidelity.cosine:.6f} / {res.fidelity.max_abs_error:.2g}"
        row["reference / rewrites / export"] = " ; ".join(
            x for x in [res.reference_runtime, ",".join(res.graph_rewrites), str(res.export or "")] if x
        )
        fp32_mnn = Path(res.artifacts["model.mnn"].uri)
        fp32_bytes = res.mnn_bytes
        row["fp32 .mnn MB"] = f"{fp32_bytes / 1e6:.2f}"
    except Exception as exc:
        row["convert"] = "FAIL"
        row["failure"] = short(exc)
        row["seconds"] = f"{time.time() - t0:.0f}"
        return row
    try:
        res = run_step(
            "convert",
            {"model": ref, "inputs": inputs, "num_samples": 4, "weights": {"bits": 8}, "tolerance": WEIGHT_ONLY_TOL, "output": str(work / "w8")},
            use_cache=False,
            quiet=True,
        )
        row["weight-only int8"] = f"ok cos {res.fidelity.cosine:.5f}, size x{res.mnn_bytes / fp32_bytes:.2f}"
    except Exception as exc:
        row["weight-only int8"] = "FAIL"
        row["failure"] = short(exc)
    image = len(inputs) == 1 and len(inputs[0]["shape"]) == 4 and inputs[0]["shape"][1] == 3 and inputs[0].get("dtype", "float32") == "float32"
    if skip_int8 or not image:
        row["full int8"] = "skipped" if skip_int8 else "n/a (not an image model)"
    else:
        h, w = inputs[0]["shape"][2:]
        for split, seed in (("calib", 1), ("eval", 2)):
            np.savez(work / f"{split}.npz", x=smooth_images(16, h, w, seed))
        pre = {"channels": "RGB", "scale": 255.0, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
        try:
            res = run_step(
                "quantize",
                {
                    "model": {"uri": str(fp32_mnn)},
                    "calibration": {"format": "npz", "uri": str(work / "calib.npz"), "preprocess": pre},
                    "evaluation": {"format": "npz", "uri": str(work / "eval.npz"), "preprocess": pre},
                    "calibration_samples": 16,
                    "output": str(work / "int8"),
                },
                use_cache=False,
                quiet=True,
            )
            row["full int8"] = f"ok cos {res.quantized.cosine:.4f}, top-1 agr {res.quantized.top1_agreement}, size x{res.size_ratio:.2f}"
        except Exception as exc:
            row["full int8"] = "FAIL"
            row["failure"] = (row.get("failure", "") + " | int8: " + short(exc)).strip(" |")
    row["seconds"] = f"{time.time() - t0:.0f}"
    return row


def torch_and_odd_models(work: Path) -> list[tuple[str, dict, list[dict]]]:
    import torch

    import test_real_models as t
    from mnnpipe.models import text_encoder

    torch.manual_seed(0)
    torch.save(text_encoder().eval().state_dict(), work / "encoder.pth")
    pool = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.MaxPool2d(3, dilation=2), torch.nn.ReLU()).eval()
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(pool, (torch.rand(1, 3, 12, 12),), str(work / "pool.onnx"), dynamo=False, opset_version=17, input_names=["x"], output_names=["y"])
    return [
        ("text encoder (torch, 2 int64 inputs)", {"uri": str(work / "encoder.pth"), "factory": "mnnpipe.models:text_encoder"}, t.ENCODER_INPUTS),
        ("opset-6 ONNX (BN6/PRelu6/AvgPool1/Gemm6)", {"uri": str(t.opset6_model(work / "old.onnx"))}, [{"name": "x", "shape": [1, 3, 8, 8]}]),
        ("float64 ONNX", {"uri": str(t.float64_model(work / "f64.onnx"))}, [{"name": "x", "shape": [1, 4], "dtype": "float64"}]),
        ("1-D audio, 220,000 samples", {"uri": str(t.long_audio_model(work / "audio.onnx", 220_000))}, [{"name": "audio", "shape": [220_000], "range": [-1, 1]}]),
        ("BatchNorm without epsilon", {"uri": str(t.batchnorm_model(work / "bn.onnx", None))}, [{"name": "x", "shape": [1, 2, 6, 6]}]),
        ("dilated MaxPool2d (torch -> ONNX)", {"uri": str(work / "pool.onnx")}, [{"name": "x", "shape": [1, 3, 12, 12]}]),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "models.md"))
    ap.add_argument("--only", nargs="*", help="Run only models whose name contains one of these strings.")
    ap.add_argument("--skip-int8", action="store_true", help="Skip full int8 (the slow part).")
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        tmp = Path(tmp)
        cases = torch_and_odd_models(tmp)
        for light in LIGHT:
            try:
                path, inputs = materialise_light(light, tmp / f"{light}.onnx")
                cases.append((f"{light} (onnx light, random weights)", {"uri": str(path)}, inputs))
            except Exception as exc:
                rows.append({"model": light, "convert": "FAIL", "failure": f"materialising: {short(exc)}"})
        for name, ref, inputs in cases:
            if args.only and not any(s in name for s in args.only):
                continue
            work = tmp / f"w{len(rows)}"
            work.mkdir()
            try:
                row = run_model(name, ref, inputs, work, args.skip_int8)
            except Exception as exc:  # the bench reports, it does not stop
                row = {"model": name, "convert": "FAIL", "failure": f"bench error {short(exc)} {traceback.format_exc(limit=1)}"}
            print(row, flush=True)
            rows.append(row)
            write(rows, Path(args.out))  # after every model: a long run that is stopped keeps what it measured
    print(Path(args.out).read_text())


def write(rows: list[dict], out: Path) -> None:
    from mnnpipe.report import machine_info, markdown_table

    cols = ["model", "inputs", "convert", "fp32 cosine / max abs err", "fp32 .mnn MB", "weight-only int8", "full int8", "reference / rewrites / export", "failure", "seconds"]
    table = markdown_table([{c: r.get(c, "") for c in cols} for r in rows], cols)
    text = (
        "# Real and odd models through convert / weight-only / full int8\n\n"
        f"Produced by `python benchmarks/bench_models.py` ({machine_info()}).\n\n"
        + __doc__.split("\n\n", 2)[2]
        + "\n"
        + table
        + "\n"
    )
    out.write_text(text)


if __name__ == "__main__":
    main()
