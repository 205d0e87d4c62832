"""ONNX files as they come from the wild: a reference runtime for old opsets, and the graph rewrites
MNN's converter needs to read a model the way ONNX means it.

Reference run (`open_reference`): ONNX Runtime refuses opset-6-era operators
(BatchNormalization(6), AveragePool(1), Gemm(6), PRelu(6), Add/Mul(6) with `broadcast`, measured on
the onnx package's operator models) although the file is a valid model that MNN converts. So the
reference is, in order: ONNX Runtime on the file; ONNX Runtime on the file upgraded by onnx's
version converter; onnx's own reference evaluator (slow, pure numpy, but it knows every opset).

Rewrites (`normalise_for_mnn`), each one a measured MNN 3.6.1 misreading, each with a test in
tests/integration/test_real_models.py:

* ``batchnorm-epsilon``: a BatchNormalization without an ``epsilon`` attribute means 1e-5 in ONNX;
  MNN's converter then uses no epsilon at all (cosine 0.49 with tiny running variances). Written
  explicitly, MNN is exact.
* ``softmax-pre13-flatten``: before opset 13, Softmax / LogSoftmax over ``axis`` (default 1) means
  "flatten to 2-D at axis, normalise each row". MNN normalises over the single axis instead: over
  [1, C, 1, 1] (SqueezeNet's classifier) every output became 1.0. Rewritten as Shape + Flatten +
  Softmax(axis=1) on 2-D + Reshape back, which means the same in every opset.
* ``static-input-shapes``: open input dimensions (names, -1) but the batch get the declared sizes;
  otherwise the .mnn stays dynamic and MNN's quantizer has no shape to calibrate at.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mnnpipe.errors import InputError, first_line

__all__ = ["REFERENCE_OPSET", "ReferenceEvaluatorRunner", "default_opset", "normalise_for_mnn", "open_reference"]

# What old models are upgraded to for ONNX Runtime: the first opset with today's Softmax/axes
# semantics, which every ONNX Runtime release runs.
REFERENCE_OPSET = 13


def default_opset(model: Any) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


class ReferenceEvaluatorRunner:
    """onnx.reference.ReferenceEvaluator behind the runners' interface (see engines.runtimes)."""

    def __init__(self, model: Any) -> None:
        from onnx.reference import ReferenceEvaluator

        self.evaluator = ReferenceEvaluator(model)
        initializers = {i.name for i in model.graph.initializer}
        self.input_names = [i.name for i in model.graph.input if i.name not in initializers]
        self.output_names = [o.name for o in model.graph.output]

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(inputs) != len(self.input_names):
            raise InputError(f"the ONNX model takes inputs {self.input_names}, got {len(inputs)} arrays")
        try:
            return [np.asarray(o) for o in self.evaluator.run(None, dict(zip(self.input_names, inputs)))]
        except Exception as exc:  # the evaluator raises whatever numpy raises for a bad shape
            shapes = ", ".join(f"'{n}' {list(np.shape(a))}" for n, a in zip(self.input_names, inputs))
            raise InputError(f"onnx's reference evaluator cannot run on inputs {shapes} ({type(exc).__name__}: {str(exc)[:200]})") from None


class _FirstThatRuns:
    """ONNX Runtime on the upgraded model, else onnx's reference evaluator on the original: the
    version converter can write a graph ONNX Runtime loads but cannot run (PRelu with one slope per
    channel, opset 6, becomes a broadcast ONNX Runtime refuses at run time)."""

    def __init__(self, upgraded: Any, original: Any) -> None:
        self.upgraded, self.original = upgraded, original
        self.input_names, self.output_names = upgraded.input_names, upgraded.output_names
        self.fallback: ReferenceEvaluatorRunner | None = None

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if self.fallback is None:
            try:
                return self.upgraded.run(inputs)
            except InputError:
                self.fallback = ReferenceEvaluatorRunner(self.original)
        return self.fallback.run(inputs)


def open_reference(uri: str, path: Path, scratch: Path) -> tuple[Any, str]:
    """A runner for the ONNX model at `path` and a few words saying which runtime it is.

    Raises InputError when no runtime can load the file (then it is not a usable ONNX model).
    """
    import onnx

    from mnnpipe.engines.runtimes import OnnxRunner

    try:
        return OnnxRunner(path, threads=1), "onnxruntime"
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        refusal = first_line(exc, 240)
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception:
        raise InputError(f"{uri}: not a loadable ONNX model ({refusal})") from None
    opset = default_opset(model)
    if opset is not None and opset < REFERENCE_OPSET:
        from onnx import version_converter

        try:
            upgraded = version_converter.convert_version(model, REFERENCE_OPSET)
            target = scratch / "reference-upgraded.onnx"
            onnx.save(upgraded, str(target))
            upgraded_runner = OnnxRunner(target, threads=1)
            return _FirstThatRuns(upgraded_runner, model), f"onnxruntime on the model upgraded from opset {opset} to {REFERENCE_OPSET}"
        except Exception:  # the converter lacks an adapter for some op: the evaluator below knows every opset
            pass
    try:
        return ReferenceEvaluatorRunner(model), "onnx.reference (ONNX Runtime refused the model)"
    except Exception as exc:
        raise InputError(f"{uri}: no ONNX runtime can run this model (ONNX Runtime: {refusal}; onnx.reference: {type(exc).__name__})") from None


def normalise_for_mnn(src: Path, dst: Path, shapes: dict[str, tuple[int, ...]] | None = None) -> list[str]:
    """Write `src` to `dst` with the rewrites MNN needs; return the rewrites applied (may be none).

    `shapes` (input name -> declared shape) fills the graph inputs' open dimensions but the batch,
    so MNN converts, and quantize later calibrates, a model with static shapes.
    """
    import shutil

    import onnx

    model = onnx.load(str(src), load_external_data=False)
    applied = []
    if shapes and _fix_input_shapes(model.graph, shapes):
        applied.append("static-input-shapes")
    if _explicit_batchnorm_epsilon(model.graph):
        applied.append("batchnorm-epsilon")
    opset = default_opset(model)
    if opset is not None and 5 <= opset < 13 and _flatten_old_softmax(model.graph):
        applied.append("softmax-pre13-flatten")
    if applied:
        onnx.save(model, str(dst))
    elif Path(src) != Path(dst):
        shutil.copyfile(src, dst)  # untouched: the same bytes
    return applied


def _explicit_batchnorm_epsilon(graph: Any) -> bool:
    from onnx import helper

    changed = False
    for node in graph.node:
        if node.op_type == "BatchNormalization" and not any(a.name == "epsilon" for a in node.attribute):
            node.attribute.append(helper.make_attribute("epsilon", 1e-5))  # ONNX's default, every opset
            changed = True
        for attr in node.attribute:  # If / Loop / Scan bodies
            if attr.g.node and _explicit_batchnorm_epsilon(attr.g):
                changed = True
            for sub in attr.graphs:
                changed = _explicit_batchnorm_epsilon(sub) or changed
    return changed


def _flatten_old_softmax(graph: Any) -> bool:
    """Softmax/LogSoftmax(x, axis) -> Reshape(Softmax(Flatten(x, axis), axis=1), Shape(x)): the
    opset < 13 meaning, spelled with ops MNN reads correctly. Only the main graph (no subgraphs)."""
    from onnx import helper

    nodes, changed = [], False
    for k, node in enumerate(graph.node):
        if node.op_type not in ("Softmax", "LogSoftmax") or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        x, y = node.input[0], node.output[0]
        tag = f"{node.name or node.op_type}_{k}_mnnpipe"
        nodes += [
            helper.make_node("Shape", [x], [f"{tag}_shape"], name=f"{tag}_shape"),
            helper.make_node("Flatten", [x], [f"{tag}_2d"], name=f"{tag}_flatten", axis=axis),
            helper.make_node(node.op_type, [f"{tag}_2d"], [f"{tag}_out"], name=node.name, axis=1),
            helper.make_node("Reshape", [f"{tag}_out", f"{tag}_shape"], [y], name=f"{tag}_reshape"),
        ]
        changed = True
    if changed:
        del graph.node[:]
        graph.node.extend(nodes)
    return changed


def _fix_input_shapes(graph: Any, shapes: dict[str, tuple[int, ...]]) -> bool:
    changed = False
    for i in graph.input:
        if i.name not in shapes:
            continue
        for k, d in enumerate(i.type.tensor_type.shape.dim):
            if k > 0 and not (d.HasField("dim_value") and d.dim_value > 0):  # the batch stays open
                d.Clear()
                d.dim_value = shapes[i.name][k]
                changed = True
    return changed


def fold_at_static_shapes(src: Path, dst: Path, shapes: dict[str, tuple[int, ...]]) -> bool:
    """Write `src` to `dst` with every input fixed to its declared shape (the batch included) and
    the shape arithmetic that then becomes constant folded away by ONNX Runtime's basic
    (standard-op only) optimizations. True when it worked.

    Why: MNN's converter mis-reads some shape subgraphs; the `expand(batch, -1)` idiom that the
    TorchScript exporter writes as Where(Equal(shape, -1), 1, shape) came out of a real
    sentence-embedding model (all-MiniLM-L6-v2) with cosine 0.25; folded, 0.999994. A last resort
    in convert, since the folded .mnn takes only the declared shapes.
    """
    import onnx
    import onnxruntime as ort

    try:
        model = onnx.load(str(src))
        for i in model.graph.input:
            if i.name in shapes:
                dims = i.type.tensor_type.shape.dim
                if len(dims) != len(shapes[i.name]):
                    return False
                for d, size in zip(dims, shapes[i.name]):
                    d.Clear()
                    d.dim_value = size
        static = dst.with_name(f"{dst.stem}-static.onnx")
        onnx.save(model, str(static))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(dst)
        opts.log_severity_level = 3
        ort.InferenceSession(str(static), opts, providers=["CPUExecutionProvider"])
        folded = onnx.load(str(dst), load_external_data=False)
    except Exception:  # a model ONNX Runtime cannot load or save (e.g. > 2 GB): no fold, the failure stands
        return False
    return all(n.domain in ("", "ai.onnx") for n in folded.graph.node)  # standard ops only, MNN reads them
