"""Where a converted .mnn goes wrong: the first op whose output differs from the ONNX source's.

When a .mnn misses its verification tolerance, the user can act only if told which op MNN got
wrong. Both runtimes can show inner tensors: ONNX Runtime returns any value made a graph output,
and MNN keeps most ONNX tensor names in the .mnn (`MNN.expr.load_as_dict`) and returns any of
them when the module is loaded with those names as outputs. So: run both on the same sample,
compare every tensor the two graphs share, in the ONNX graph's (topological) order, and name the
first that diverges. Tensors MNN fused away (a Conv's output before its BatchNormalization) are
not compared; the next shared tensor then stands for the fused ops.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["Divergence", "DivergenceRow", "find_divergence", "remedy"]

# A tensor diverges when its worst error is beyond this share of its largest magnitude, or its
# cosine to the source drops below MIN_COSINE: loose enough for float32 reassociation.
MAX_RELATIVE_ERROR = 1e-3
MIN_COSINE = 0.999

_REMEDIES = {
    "BatchNormalization": "write epsilon explicitly (mnnpipe does for a missing one) or fold the BatchNorm into the conv before export",
    "Softmax": "re-export at opset >= 13 (the axis semantics changed there)",
    "Pad": "re-export with a different pad (e.g. F.pad inside the conv) or report the op to MNN",
    "MaxPool": "avoid dilation in pooling or report the op to MNN",
}
_DEFAULT_REMEDY = "re-export at another opset, keep the op in float (quantize skip_layers), or report the op to MNN upstream"


def remedy(op_type: str) -> str:
    return _REMEDIES.get(op_type, _DEFAULT_REMEDY)


@dataclass(frozen=True)
class DivergenceRow:
    tensor: str
    node: str
    op_type: str
    shape_source: tuple[int, ...]
    shape_mnn: tuple[int, ...]
    max_abs_error: float
    relative_error: float
    cosine: float
    fused: bool = False  # differs, but only because MNN fused the next op into this one
    fused_with: tuple[tuple[str, str], ...] = ()  # (node, op type) before this one whose tensors MNN fused away

    @property
    def ops(self) -> list[tuple[str, str]]:
        return [*self.fused_with, (self.node, self.op_type)]

    @property
    def diverges(self) -> bool:
        if self.fused:
            return False
        return self.shape_source != self.shape_mnn or self.relative_error > MAX_RELATIVE_ERROR or self.cosine < MIN_COSINE


@dataclass(frozen=True)
class Divergence:
    rows: list[DivergenceRow]

    @property
    def first(self) -> DivergenceRow | None:
        return next((r for r in self.rows if r.diverges), None)

    def summary(self) -> str:
        """One line for the error message."""
        row = self.first
        if row is None:
            return f"no shared inner tensor diverges ({len(self.rows)} compared): the difference is in the outputs' last ops"
        where = f"op '{row.node}' ({row.op_type})" if row.node else f"{row.op_type} op (output '{row.tensor}')"
        if row.fused_with:
            where += ", fused in MNN with " + ", ".join(f"'{n}' ({t})" if n else t for n, t in row.fused_with)
        if row.shape_source != row.shape_mnn:
            what = f"shape {list(row.shape_mnn)} in MNN, {list(row.shape_source)} in the source"
        else:
            what = f"cosine {row.cosine:.4f}, max abs error {row.max_abs_error:.3g}"
        specific = [t for _, t in row.ops if t in _REMEDIES]  # the op with a known MNN problem, fused or not
        return f"first diverging {where}: {what}; try: {remedy(specific[0] if specific else row.op_type)}"

    def to_markdown(self) -> str:
        lines = [
            "# Where the .mnn diverges from the source",
            "",
            f"Inner tensors shared by model.onnx and model.mnn, in graph order, on one verification sample. "
            f"A tensor diverges when its relative error exceeds {MAX_RELATIVE_ERROR:g} or its cosine drops below {MIN_COSINE}.",
            "",
            self.summary(),
            "",
            "| # | tensor | op | type | shape (source) | shape (MNN) | max abs error | relative error | cosine | diverges |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for i, r in enumerate(self.rows):
            ops = " + ".join(f"`{n}`" for n, _ in r.ops)
            types = " + ".join(t for _, t in r.ops)
            lines.append(
                f"| {i} | `{r.tensor}` | {ops} | {types} | {list(r.shape_source)} | {list(r.shape_mnn)} | "
                f"{r.max_abs_error:.3g} | {r.relative_error:.3g} | {r.cosine:.6f} | {'**yes**' if r.diverges else ('fused by MNN' if r.fused else '')} |"
            )
        return "\n".join(lines) + "\n"


def _row(tensor: str, node: Any, ref: np.ndarray, got: np.ndarray) -> DivergenceRow:
    ref64, got64 = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if ref64.shape != got64.shape and ref64.size == got64.size:
        got64 = got64.reshape(ref64.shape)  # MNN keeps some tensors as [N, C, 1, 1] for its conv kernels
    if ref64.shape != got64.shape:
        return DivergenceRow(tensor, node.name, node.op_type, ref64.shape, got64.shape, float("inf"), float("inf"), -1.0)
    finite = np.isfinite(ref64) & np.isfinite(got64)
    if not np.array_equal(np.isfinite(ref64), np.isfinite(got64)):  # e.g. MNN's -inf attention mask where torch has none
        return DivergenceRow(tensor, node.name, node.op_type, ref64.shape, got64.shape, float("inf"), float("inf"), -1.0)
    shape = ref64.shape
    ref64, got64 = ref64[finite], got64[finite]  # -inf fills (attention masks) compare as equal
    diff = float(np.abs(ref64 - got64).max()) if ref64.size else 0.0
    scale = float(np.abs(ref64).max()) if ref64.size else 0.0
    denom = float(np.linalg.norm(ref64) * np.linalg.norm(got64))
    cosine = float(np.clip(np.dot(ref64.ravel(), got64.ravel()) / denom, -1.0, 1.0)) if denom > 0 else float(np.allclose(ref64, got64))
    return DivergenceRow(tensor, node.name, node.op_type, shape, shape, diff, diff / (scale + 1e-6), cosine)


def find_divergence(onnx_path: Path, mnn_path: Path, input_names: Sequence[str], sample: Sequence[np.ndarray], scratch: Path) -> Divergence:
    """Compare every inner tensor model.onnx and model.mnn share, on one sample (a list of arrays)."""
    import onnx
    import onnxruntime as ort

    from .engines.mnn import import_mnn, load_session

    import_mnn()
    import MNN.expr as F

    model = onnx.load(str(onnx_path))
    in_mnn = set(F.load_as_dict(str(mnn_path)))
    graph_inputs = {i.name for i in model.graph.input}
    candidates = [
        (out, node) for node in model.graph.node for out in node.output if out and out in in_mnn and out not in graph_inputs
    ]
    existing = {o.name for o in model.graph.output}
    for out, _ in candidates:
        if out not in existing:
            model.graph.output.append(onnx.ValueInfoProto(name=out))
    probe = scratch / "divergence-probe.onnx"
    onnx.save(model, str(probe))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every inner tensor as the graph defines it
    session = ort.InferenceSession(str(probe), opts, providers=["CPUExecutionProvider"])
    feed = dict(zip([i.name for i in session.get_inputs()], sample))
    source = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))

    rows = []
    with _stdout_silenced():  # MNN prints "call to readMap meet a error" for folded tensors
        for out, node in candidates:
            if node.op_type in _NOT_COMPARED or not np.issubdtype(np.asarray(source[out]).dtype, np.floating):
                continue  # shapes, indices and masks: their consumers show any error
            try:  # one tensor per load: MNN drops every output when one of them cannot be computed
                got = load_session(mnn_path, input_names=list(input_names), output_names=[out]).run(list(sample))[0]
            except Exception:  # a tensor MNN names but cannot return (a constant it folded): not comparable
                continue
            row = _row(out, node, source[out], got)
            rows.append(replace(row, fused_with=_fused_before(node, model.graph, {r.tensor for r in rows} | graph_inputs)))
    return Divergence(_drop_fusion_artifacts(rows, model.graph))


def _fused_before(node: Any, graph: Any, compared: set[str]) -> tuple[tuple[str, str], ...]:
    """The chain of ops feeding `node` whose outputs could not be compared (MNN fused them in)."""
    producer = {o: n for n in graph.node for o in n.output}
    initializers = {i.name for i in graph.initializer}
    chain: list[tuple[str, str]] = []
    current = node
    while True:
        feeds = [i for i in current.input if i and i not in initializers and i in producer]
        if len(feeds) != 1 or feeds[0] in compared:
            break
        current = producer[feeds[0]]
        if current.op_type in _NOT_COMPARED:
            break
        chain.append((current.name, current.op_type))
    return tuple(reversed(chain))


def _drop_fusion_artifacts(rows: list[DivergenceRow], graph: Any) -> list[DivergenceRow]:
    """Mark as not diverging a tensor whose next op's output agrees again.

    MNN fuses an activation into the op before it and keeps the first op's tensor name for the
    fused result (measured: a Linear's `Add` output came back after its ReLU, cosine 0.71, while
    the ReLU's output matched exactly). A real error does not heal one op later.
    """
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).extend(o for o in node.output if o)
    fine = {r.tensor for r in rows if not r.diverges}
    kept = []
    for r in rows:
        if r.diverges and any(o in fine for o in consumers.get(r.tensor, [])):
            r = replace(r, fused=True)
        kept.append(r)
    return kept


_NOT_COMPARED = {"Constant", "ConstantOfShape", "Shape", "Size"}


@contextlib.contextmanager
def _stdout_silenced():
    """C++ code writes to file descriptor 1 directly; `mnnpipe run` prints its JSON there."""
    import ctypes

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            try:
                yield
            finally:
                ctypes.CDLL(None).fflush(None)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
