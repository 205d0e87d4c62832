"""Per-layer int8 sensitivity and the greedy choice of layers to keep in float.

Sensitivity of a layer = how much the model degrades when ONLY that layer is int8 (every other
quantizable layer skipped), measured end to end on the evaluation set. That isolates the layer's
own error, unlike per-tensor distances inside a fully quantized model, which accumulate the error
of every layer upstream. The per-tensor cosine from MNN's `debug: true` log is reported beside it.

This module does no quantizing itself: the step passes an `evaluate(skip)` callable, so the
search logic is plain Python and testable without MNN.
"""

from __future__ import annotations

from typing import Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field

from .verify import Fidelity

QUANTIZABLE_OPS = ("Convolution", "ConvolutionDepthwise")  # the op types MNN's quantizer makes int8


class Evaluation(BaseModel):
    """How a quantized candidate compares with the fp32 model on the evaluation set."""

    model_config = ConfigDict(extra="forbid")

    cosine: float = Field(description="Cosine similarity of all outputs, candidate vs fp32.")
    accuracy: float | None = Field(None, description="Top-1 accuracy (0-1) on labelled data; None when unlabelled.")
    accuracy_drop_pp: float | None = Field(None, description="fp32 accuracy minus this accuracy, in percentage points.")
    top1_agreement: float | None = Field(None, description="Share of samples whose argmax equals the fp32 model's.")
    fidelity: Fidelity | None = Field(None, description="Every output metric measured against the fp32 model, for its output kind.")


class LayerSensitivity(BaseModel):
    """One row of the sensitivity table."""

    model_config = ConfigDict(extra="forbid")

    layer: str = Field(description="MNN op name (usable in skip_layers).")
    op_type: str = Field(description="MNN op type.")
    alone: Evaluation = Field(description="The model with only this layer in int8.")
    debug_cosine: float | None = Field(
        None, description="Cosine of this layer's output tensor in the fully int8 model (MNN debug log)."
    )

    @property
    def error(self) -> float:
        """The ranking key: accuracy lost first (what the budget is about), then output error."""
        return (self.alone.accuracy_drop_pp or 0.0) * 1e3 + (1.0 - self.alone.cosine)


def quantizable_layers(mnn_path: str) -> list[tuple[str, str]]:
    """(op name, op type) of every layer MNN's quantizer would make int8, in execution order.

    Read from the .mnn's op list (no weights loaded, nothing run): the op names the quantizer
    matches `skip_quant_op_names` against (not the tensor names `MNN.expr` shows). The file order
    is the execution order; running the model with MNN's per-op callback gave the same list on
    MobileNetV2 and ResNet-18.
    """
    from .engines.mnn_file import read_ops

    seen: list[tuple[str, str]] = []
    for op in read_ops(mnn_path):
        if op.type in QUANTIZABLE_OPS and (op.name, op.type) not in seen:
            seen.append((op.name, op.type))
    return seen


def measure(
    layers: Sequence[tuple[str, str]],
    evaluate: Callable[[list[str]], Evaluation],
    *,
    always_skip: Sequence[str] = (),
    debug_cosines: dict[str, float] | None = None,
    progress: Callable[[Sequence[tuple[str, str]]], Sequence[tuple[str, str]]] = lambda it: it,
) -> list[LayerSensitivity]:
    """Quantize one layer at a time (all others skipped) and evaluate; most sensitive first."""
    names = [name for name, _ in layers]
    rows = []
    for name, kind in progress(layers):
        if name in always_skip:
            continue
        others = [n for n in names if n != name]
        rows.append(
            LayerSensitivity(
                layer=name, op_type=kind, alone=evaluate(others), debug_cosine=(debug_cosines or {}).get(name)
            )
        )
    return sorted(rows, key=lambda r: r.error, reverse=True)


def greedy_float_layers(
    ranked: Sequence[LayerSensitivity],
    evaluate: Callable[[list[str]], Evaluation],
    within_budget: Callable[[Evaluation], bool],
    *,
    always_skip: Sequence[str] = (),
) -> tuple[list[str], Evaluation, list[tuple[list[str], Evaluation]]]:
    """Keep the most sensitive layers in float, one more at a time, until within budget.

    Returns (layers kept in float, the evaluation that met the budget, every attempt). Returns
    the last attempt with an unmet budget when even keeping every ranked layer in float fails;
    the caller decides how to fail.
    """
    skip = list(always_skip)
    attempts = []
    current = evaluate(skip)
    attempts.append((list(skip), current))
    for row in ranked:
        if within_budget(current):
            break
        skip.append(row.layer)
        current = evaluate(skip)
        attempts.append((list(skip), current))
    return skip, current, attempts


def to_markdown(rows: Sequence[LayerSensitivity], float_layers: Sequence[str] = ()) -> str:
    """The sensitivity table, most sensitive layer first."""
    lines = [
        "# Per-layer int8 sensitivity",
        "",
        "Each row: the model with ONLY that layer in int8 (all other quantizable layers in float),",
        "compared with the fp32 model on the evaluation set. Debug cosine: that layer's output",
        "tensor in the fully int8 model, from MNN's quantizer debug log.",
        "",
        "| rank | layer | op | accuracy drop (pp) | output cosine | top-1 agreement | debug cosine | kept in float |",
        "|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for i, r in enumerate(rows, 1):
        drop = "n/a" if r.alone.accuracy_drop_pp is None else f"{r.alone.accuracy_drop_pp:.2f}"
        agree = "n/a" if r.alone.top1_agreement is None else f"{r.alone.top1_agreement:.4f}"
        dbg = "n/a" if r.debug_cosine is None else f"{r.debug_cosine:.6f}"
        kept = "yes" if r.layer in float_layers else ""
        lines.append(f"| {i} | `{r.layer}` | {r.op_type} | {drop} | {r.alone.cosine:.6f} | {agree} | {dbg} | {kept} |")
    return "\n".join(lines) + "\n"
