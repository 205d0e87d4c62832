"""The onnx package's 117 operator-level models (pytorch-operator/, pytorch-converted/) through convert,
weight-only int8 and full int8, each also checked against the reference outputs shipped with it.

Used by bench_models.py; `python benchmarks/zoo_operators.py [NAME ...]` runs them alone and prints rows.

Per model (all through run_step, what `mnnpipe run` does):
  convert      inputs read from the graph (no `inputs` in the spec), verified against onnxruntime or
               the upgraded-opset reference run at the default tolerance; if that fails, once more with
               the inputs declared from the shipped reference input (noted);
  shipped ref  the fp32 .mnn run on the shipped reference input, compared with the shipped output
               ("ok" when max abs error <= 1e-3 or cosine >= 0.999; NaN must be where the shipped output
               has NaN; n/a where the shipped arrays were saved from uninitialised memory);
  weight-only  convert with 8-bit weights (cosine >= 0.999; top-1 not gated: most outputs are not logits);
  full int8    quantize the fp32 .mnn with `inputs`, EMA with batch 1 (16 seeded random calibration inputs drawn from
               the shipped input's value range), checked on 8 other random inputs against the fp32
               model (cosine >= 0.99; top-1 not gated).
"""

from __future__ import annotations

import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = ("pytorch-operator", "pytorch-converted")
WEIGHT_ONLY_TOL = {"max_abs_error": None, "min_cosine": 0.999, "min_top1_agreement": 0.0}
INT8_FIDELITY = {"max_abs_error": None, "min_cosine": 0.99, "min_top1_agreement": 0.0}
SPEC_DTYPES = {"float32", "float64", "int64", "int32", "uint8"}


def operator_models() -> list[Path]:
    import onnx

    data = Path(onnx.__file__).parent / "backend" / "test" / "data"
    return sorted(d for kind in KINDS for d in (data / kind).iterdir() if (d / "model.onnx").is_file())


def describe(model_dir: Path) -> dict:
    """Op types with the opset version each resolves to, data inputs, and the shipped reference arrays."""
    import onnx
    from onnx import defs, numpy_helper

    model = onnx.load(str(model_dir / "model.onnx"))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    ops = []
    for node in model.graph.node:
        try:
            since = defs.get_schema(node.op_type, opset, node.domain).since_version
        except Exception:
            since = "?"
        ops.append(f"{node.op_type}({since})")
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]

    def read(pattern: str) -> list[np.ndarray]:
        out = []
        for p in sorted((model_dir / "test_data_set_0").glob(pattern)):
            t = onnx.TensorProto()
            t.ParseFromString(p.read_bytes())
            out.append(numpy_helper.to_array(t))
        return out

    return {"opset": opset, "ops": ops, "input_names": names, "ref_in": read("input_*.pb"), "ref_out": read("output_*.pb")}


def _short(exc: BaseException, limit: int = 700) -> str:  # long enough to reach the diverging op's name
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _input_specs(names: list[str], arrays: list[np.ndarray]) -> list[dict]:
    """TensorSpecs from the shipped reference input: its shape, dtype and value range."""
    specs = []
    for name, a in zip(names, arrays):
        lo, hi = (float(a.min()), float(a.max())) if a.size and garbage(a) is None else (0.0, 1.0)
        if a.dtype.kind in "iu":
            lo, hi = float(np.floor(lo)), float(np.floor(hi)) + 1  # [low, high): keep the largest index
        if not lo < hi:
            lo, hi = lo - 0.5, lo + 0.5
        specs.append({"name": name, "shape": list(a.shape) or [1], "dtype": str(a.dtype), "range": [lo, hi]})
    return specs


def garbage(a: np.ndarray) -> str | None:
    """Why a shipped array is not a usable reference (some were saved from uninitialised memory), or None."""
    if a.dtype.kind == "f" and a.size and (np.isinf(a).any() or np.abs(np.nan_to_num(a)).max() > 1e30):
        return "shipped reference holds uninitialised memory (|x| up to %.1g)" % float(np.abs(np.nan_to_num(a, posinf=0, neginf=0)).max())
    return None


def _compare(got: list[np.ndarray], want: list[np.ndarray]) -> tuple[float, float]:
    """Worst max abs error and worst cosine over the outputs."""
    err, cos = 0.0, 1.0
    for g, w in zip(got, want):
        g = np.asarray(g, np.float64).reshape(-1)
        w = np.asarray(w, np.float64).reshape(-1)
        if g.shape != w.shape:
            raise ValueError(f"shape {list(g.shape)} vs shipped {list(w.shape)}")
        if (np.isnan(g) != np.isnan(w)).any():  # e.g. sqrt of a negative input: NaN where the shipped output has NaN
            return float("inf"), -1.0
        keep = ~np.isnan(w)
        g, w = g[keep], w[keep]
        err = max(err, float(np.abs(g - w).max()) if g.size else 0.0)
        n = np.linalg.norm(g) * np.linalg.norm(w)
        c = float(g @ w / n) if n > 0 else float(np.allclose(g, w))
        cos = min(cos, min(c, 1.0))
    return err, cos


def run_operator_model(model_dir: Path, work: Path, skip_int8: bool = False) -> dict:
    from mnnpipe.engines.mnn import load_session
    from mnnpipe.runner import run_step

    t0 = time.time()
    info = describe(model_dir)
    row = {
        "model": model_dir.name,
        "set": model_dir.parent.name,
        "opset": info["opset"],
        "ops": " ".join(sorted(set(info["ops"]))),
        "inputs": ", ".join(f"{list(a.shape)} {a.dtype}" for a in info["ref_in"]),
        "_ops": sorted(set(info["ops"])),
    }
    ref = {"uri": str(model_dir / "model.onnx")}
    declared = _input_specs(info["input_names"], info["ref_in"])
    unsupported = sorted({d["dtype"] for d in declared} - SPEC_DTYPES)
    res = None
    try:
        res = run_step("convert", {"model": ref, "num_samples": 4, "output": str(work / "fp32")}, use_cache=False, quiet=True)
        row["convert"] = "ok"
    except Exception as exc:
        row["failure"] = "inputs from the graph: " + _short(exc)
        if not unsupported:
            try:  # the graph's own input declarations may be what failed: declare them from the shipped input
                res = run_step(
                    "convert", {"model": ref, "inputs": declared, "num_samples": 4, "output": str(work / "fp32d")}, use_cache=False, quiet=True
                )
                row["convert"] = "ok (inputs declared)"
            except Exception as exc2:
                row["failure"] += " | declared from the shipped input: " + _short(exc2, 150)
    if res is None:
        row["convert"] = "FAIL"
        row["seconds"] = f"{time.time() - t0:.1f}"
        return row
    row.pop("failure", None)
    row["fp32 cosine / max abs err"] = f"{res.fidelity.cosine:.6f} / {res.fidelity.max_abs_error:.2g}"
    row["reference"] = res.reference_runtime + (f" ; {','.join(res.graph_rewrites)}" if res.graph_rewrites else "")
    fp32_mnn = Path(res.artifacts["model.mnn"].uri)
    fp32_bytes = res.mnn_bytes
    bad = next((g for g in map(garbage, info["ref_in"] + info["ref_out"]) if g), None)
    try:
        if bad:
            raise ValueError(bad)
        session = load_session(fp32_mnn, threads=1, precision="normal")
        got = session.run([np.ascontiguousarray(a.astype(np.float32) if a.dtype == np.float64 else a) for a in info["ref_in"]])
        err, cos = _compare(got, info["ref_out"])
        ok = err <= 1e-3 or cos >= 0.999
        row["shipped ref"] = f"{'ok' if ok else 'DIFF'} {err:.2g} / {cos:.6f}"
    except Exception as exc:
        row["shipped ref"] = f"n/a ({bad})" if bad else f"not run ({_short(exc)[:120]})"
    try:
        w8 = run_step(
            "convert",
            {"model": ref, "inputs": declared if row["convert"] != "ok" else None, "num_samples": 4, "weights": {"bits": 8}, "tolerance": WEIGHT_ONLY_TOL, "output": str(work / "w8")},
            use_cache=False,
            quiet=True,
        )
        row["weight-only int8"] = f"ok cos {w8.fidelity.cosine:.5f}, size x{w8.mnn_bytes / fp32_bytes:.2f}"
    except Exception as exc:
        row["weight-only int8"] = "FAIL"
        row["failure"] = "w8: " + _short(exc)
    if skip_int8:
        row["full int8"] = "skipped"
    elif unsupported:
        row["full int8"] = f"n/a (input dtype {', '.join(unsupported)})"
    else:
        try:
            q = run_step(
                "quantize",
                {
                    "model": {"uri": str(fp32_mnn)},
                    "inputs": declared,
                    "num_samples": 8,
                    "calibration_samples": 16,
                    "activation_method": "EMA",  # KL crashes MNN 3.6.1 on ReduceMean and 3-D pooling
                    "batch_size": 1,
                    "fidelity": INT8_FIDELITY,
                    "output": str(work / "int8"),
                },
                use_cache=False,
                quiet=True,
            )
            row["full int8"] = f"ok cos {q.quantized.cosine:.4f}, size x{q.size_ratio:.2f}"
        except Exception as exc:
            if "produced no int8 layers" in str(exc):  # nothing in the model that MNN quantizes: not a failure
                row["full int8"] = "n/a (no op MNN quantizes)"
                row["seconds"] = f"{time.time() - t0:.1f}"
                return row
            row["full int8"] = "FAIL"
            row["failure"] = (row.get("failure", "") + " | int8: " + _short(exc)).strip(" |")
    row["seconds"] = f"{time.time() - t0:.1f}"
    return row


def outcome(cell: str) -> str:
    return "ok" if cell.startswith("ok") else ("fail" if cell.startswith(("FAIL", "DIFF")) else "n/a")


def summary_by_op(rows: list[dict]) -> list[dict]:
    """One row per op type (with its resolved opset version): how many models hold it, and their outcomes."""
    per_op: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        for op in r.get("_ops", []):
            c = per_op[op]
            c["models"] += 1
            for col in ("convert", "shipped ref", "weight-only int8", "full int8"):
                c[(col, outcome(r.get(col, "")))] += 1
    out = []
    for op, c in sorted(per_op.items()):
        d = {"op (version)": op, "models": c["models"]}
        for col in ("convert", "shipped ref", "weight-only int8", "full int8"):
            ok, fail = c[(col, "ok")], c[(col, "fail")]
            d[col] = f"{ok} ok" + (f", {fail} fail" if fail else "") + (f", {c['models'] - ok - fail} n/a" if c["models"] - ok - fail else "")
        out.append(d)
    return out


if __name__ == "__main__":
    import tempfile

    wanted = sys.argv[1:]
    with tempfile.TemporaryDirectory(prefix="zoo-ops-") as tmp:
        for i, d in enumerate(operator_models()):
            if wanted and d.name not in wanted:
                continue
            w = Path(tmp) / f"m{i}"
            w.mkdir()
            r = run_operator_model(d, w)
            r.pop("_ops")
            print(r, flush=True)
