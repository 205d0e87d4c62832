"""quantize: make an MNN model smaller (and, on ARM, faster) within an accuracy budget.

Modes:
* `full-int8`: weights AND activations in int8, with MNN's offline quantizer calibrated on a
  dataset (activation scales by KL / EMA, weights per output channel by MAX_ABS / ADMM). A model
  with several inputs (`inputs`) is calibrated with every input per sample (MNN's sequence layout).
* `qat`: int8 after a quantization-aware fine-tune (mnnpipe.qat), scales handed to the converter.
* `weight-only`: int8/int4 weights stored by the converter, float compute (size only).
* `fp16`: fp16 weights stored by the converter (size only).

Every mode measures the result in MNN's runtime against the fp32 .mnn on the evaluation set and
fails (StepFailed, nothing published) when the accuracy drop exceeds `max_accuracy_drop`.
`mixed_precision: auto` keeps the fewest, most sensitive layers in float needed to meet it.
`calibration_ladder: auto` tries several calibration settings (KL, EMA batch 1, more samples,
feature clamping) and keeps the best that meets it. A model larger than the fp32 .mnn is warned
about, and refused over `max_size_ratio`.

Which fields each mode takes is declared once, in `_MODE_FIELDS` (with `_MODE_MODEL_FORMATS` and
`_MODE_WEIGHTS`); one validator and the JSON Schema (`x-modes` per field, an `allOf` of if/then per
mode) are derived from it. The spec stays one flat model rather than one sub-spec per mode (a
discriminated union, as torchao has one config per scheme) on purpose: a recipe search varies one
field by dotted path (`quantize.mode: [full-int8, weight-only]`, `quantize.calibration_samples`) and
the KFP component sets `mode`, `qat_epochs`... as separate parameters, which nested or per-mode
classes would turn into whole-object replacements; the catalog needs one StepSpec class; and a
closed per-mode class would refuse the tunables a base recipe carries for another mode (e.g.
`calibration_samples` when a search switches to weight-only), which the table marks "ignored".
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import to_jsonable_python

from ..catalog import HandOff, register
from ..errors import InputError, SpecError, StepFailed, ToolError
from ..sensitivity import Evaluation, LayerSensitivity
from ..specs import (
    DatasetRef, ModelRef, StepResult, StepSpec, TensorSpec, Tolerance, accuracy_drop_pp, exceeds_accuracy_budget,
    max_accuracy_drop_field,
)  # fmt: skip
from .convert import WeightCompression

# Measured on MNN 3.6.1 (see benchmarks/results/quantize.md): ADMM activation calibration
# crashes the quantizer (SIGSEGV / "corrupted size vs. prev_size") on every model we tried.
_ADMM_CRASH = (
    "activation_method 'ADMM' crashes MNN 3.6.1's quantizer (SIGSEGV / heap corruption, measured on "
    "the digits CNN and MobileNetV2); use 'KL' or 'EMA'"
)

Mode = Literal["full-int8", "qat", "weight-only", "fp16"]
_MODES: tuple[str, ...] = get_args(Mode)


def _row(full_int8: str, qat: str, weight_only: str, fp16: str) -> dict[str, str]:
    return dict(zip(_MODES, (full_int8, qat, weight_only, fp16), strict=True))


# How each mode uses each mode-dependent field; Spec._mode_fields and the schema read only this.
#   required   must be given (not null)       required*  must be given unless `inputs` is
#   optional   used when given                ignored    accepted but unused (a search may switch
#                                                        `mode` over a base recipe carrying it)
#   rejected   giving it (anything but its default) is an error: it would silently do nothing
_MODE_FIELDS: dict[str, dict[str, str]] = {
    #                             full-int8    qat          weight-only  fp16
    "calibration":           _row("required*", "required",  "rejected",  "rejected"),
    "evaluation":            _row("required*", "required",  "optional",  "optional"),
    "inputs":                _row("optional",  "rejected",  "optional",  "optional"),
    "weights":               _row("rejected",  "rejected",  "optional",  "optional"),
    "skip_layers":           _row("optional",  "rejected",  "rejected",  "rejected"),
    "sensitivity":           _row("optional",  "rejected",  "rejected",  "rejected"),
    "mixed_precision":       _row("optional",  "rejected",  "rejected",  "rejected"),
    "calibration_ladder":    _row("optional",  "rejected",  "rejected",  "rejected"),
    "max_attempts_s":        _row("optional",  "ignored",   "ignored",   "ignored"),
    "calibration_samples":   _row("optional",  "ignored",   "ignored",   "ignored"),
    "activation_method":     _row("optional",  "ignored",   "ignored",   "ignored"),
    "weight_method":         _row("optional",  "ignored",   "ignored",   "ignored"),
    "batch_size":            _row("optional",  "ignored",   "ignored",   "ignored"),
    "qat_epochs":            _row("ignored",   "optional",  "ignored",   "ignored"),
    "qat_lr":                _row("ignored",   "optional",  "ignored",   "ignored"),
}  # fmt: skip
# What a required field is for, in its error message.
_REQUIRED_FOR = {
    ("calibration", "full-int8"): "a DatasetRef to calibrate on",
    ("calibration", "qat"): "the labelled set the fine-tune trains on",
    ("evaluation", "full-int8"): "a held-out DatasetRef",
    ("evaluation", "qat"): "a held-out DatasetRef",
}
# Model formats a mode reads (None: any); "auto" is resolved from the extension before the check.
_CONVERTER_READS = ("torchscript", "torch-export", "state-dict", "onnx")
_MODE_MODEL_FORMATS: dict[str, tuple[tuple[str, ...] | None, str]] = {
    "full-int8": (None, ""),
    "qat": (("state-dict",), "mode 'qat' fine-tunes the torch model: give a state-dict (.pth) with its factory"),
    "weight-only": (_CONVERTER_READS, "mode 'weight-only' is applied by the converter, which reads torch or ONNX models; give the source model, not {what}"),
    "fp16": (_CONVERTER_READS, "mode 'fp16' is applied by the converter, which reads torch or ONNX models; give the source model, not {what}"),
}  # fmt: skip
# The converter modes' `weights`: the WeightCompression field that must be set, and the default.
_MODE_WEIGHTS: dict[str, tuple[str, WeightCompression, str]] = {
    "weight-only": ("bits", WeightCompression(bits=8), "weights.bits (2-8), or omit weights for 8 bits"),
    "fp16": ("fp16", WeightCompression(fp16=True), "weights.fp16 true (or omit weights)"),
}
# Fields that measure a single-input model: refused with `inputs` whatever the mode.
_SINGLE_INPUT_ONLY = {
    "evaluation": "evaluation feeds one input; with inputs the check uses random inputs: omit evaluation",
    "sensitivity": "sensitivity and mixed_precision measure single-input models; with inputs use skip_layers",
    "mixed_precision": "sensitivity and mixed_precision measure single-input models; with inputs use skip_layers",
    "calibration_ladder": "calibration_ladder auto applies to a single-input model (not with inputs)",
}


def _modes_using(field: str) -> str:
    modes = [m for m, use in _MODE_FIELDS[field].items() if use not in ("rejected", "ignored")]
    return f"mode {modes[0]} only" if len(modes) == 1 else f"modes {' / '.join(modes)}"


def _mode_schema(schema: dict[str, Any]) -> None:
    """Document the table in the JSON Schema: `x-modes` on each field, and per mode an if/then."""
    props = schema.get("properties", {})
    for field, uses in _MODE_FIELDS.items():
        props[field]["x-modes"] = {m: "required unless inputs" if u == "required*" else u for m, u in uses.items()}
    rules = []
    for mode in _MODES:
        then: dict[str, Any] = {"properties": {}}
        required = [f for f, uses in _MODE_FIELDS.items() if uses[mode] == "required"]
        if required:
            then["required"] = required
        unless_inputs = [{"anyOf": [{"required": [f]}, {"required": ["inputs"]}]} for f, uses in _MODE_FIELDS.items() if uses[mode] == "required*"]
        if unless_inputs:
            then["allOf"] = unless_inputs
        for f, uses in _MODE_FIELDS.items():
            if uses[mode] == "rejected":
                then["properties"][f] = {"const": to_jsonable_python(Spec.model_fields[f].default)}
        formats, _ = _MODE_MODEL_FORMATS[mode]
        if formats is not None:
            then["properties"]["model"] = {"properties": {"format": {"enum": [*formats, "auto"]}}}
        if mode in _MODE_WEIGHTS:
            key = _MODE_WEIGHTS[mode][0]
            must = {"required": [key], "properties": {key: {"not": {"enum": [None, False]}}}}
            then["properties"]["weights"] = {"anyOf": [{"type": "null"}, must]}
        cond: dict[str, Any] = {"properties": {"mode": {"const": mode}}}
        if mode != Spec.model_fields["mode"].default:
            cond["required"] = ["mode"]
        rules.append({"if": cond, "then": then})
    single = {f: {"const": to_jsonable_python(Spec.model_fields[f].default)} for f in _SINGLE_INPUT_ONLY}
    rules.append({"if": {"properties": {"inputs": {"type": "array"}}, "required": ["inputs"]}, "then": {"properties": single}})
    schema["allOf"] = rules


class Spec(StepSpec):
    """Quantize a model for MNN: full int8 (calibrated), weight-only int8/int4, or fp16."""

    model_config = ConfigDict(json_schema_extra=_mode_schema)

    kind: Literal["quantize"] = Field("quantize", description="The step this spec is for.")
    model: ModelRef = Field(
        description="The fp32 model: an .mnn from convert, or a torch/ONNX model (converted to fp32 .mnn first)."
    )
    input: TensorSpec | None = Field(
        None,
        description="Input name and shape [1, C, H, W]; needed to export torch models, ignored for .mnn/ONNX "
        "(read from the model).",
    )
    inputs: list[TensorSpec] | None = Field(
        None,
        description="Every input of a multi-input model in call order (e.g. input_ids and attention_mask, int64), "
        "instead of `input`. The quantized model is then checked against the fp32 model on `num_samples` seeded "
        "random inputs drawn from each input's range (omit `evaluation`). full-int8 calibrates on `calibration` "
        "(an npz with one array per input name) or, without it, on `calibration_samples` seeded random inputs.",
    )
    num_samples: int = Field(
        16, ge=1, le=4096, description="Random inputs the models are compared on without an evaluation set (`inputs`, or weight-only / "
        "fp16 without `evaluation`)."
    )
    mode: Mode = Field(
        "full-int8",
        description="full-int8: int8 weights and activations (int8 kernels); qat: the same after a "
        "quantization-aware fine-tune of a state-dict model on the labelled `calibration` set (recovers what "
        "post-training int8 loses); weight-only: int8/int4 weights "
        "(`weights.bits`, default 8), float compute; fp16: fp16 weights. weight-only and fp16 go through the "
        "converter and need a torch or ONNX `model`.",
    )
    weights: WeightCompression | None = Field(
        None,
        description="Converter weight compression for mode weight-only / fp16 (the convert step's own sub-spec); "
        "None: 8-bit weights for weight-only, fp16 for fp16.",
    )
    calibration: DatasetRef | None = Field(
        None,
        description="Samples the int8 activation ranges are calibrated on (mode full-int8; required there unless "
        "`inputs` is given), preprocessed exactly as the model expects. With `inputs`: format npz, one array per "
        "input name holding every sample of that input.",
    )
    evaluation: DatasetRef | None = Field(
        None,
        description="Required unless `inputs` is given or the mode is weight-only / fp16 (then the model is checked "
        "on `num_samples` seeded random inputs within the input's range). Held-out set the quantized model is measured on against the fp32 model: top-1 accuracy "
        "when it has labels, output fidelity otherwise. Use a split other than the calibration's.",
    )
    activation_method: Literal["KL", "ADMM", "EMA"] = Field(
        "KL",
        description="How activation ranges are chosen (MNN's feature_quantize_method). KL crashes MNN 3.6.1 on "
        "models with ReduceMean or LRN (use EMA there; such models are refused before the quantizer runs); ADMM "
        "is rejected: it crashes 3.6.1 on every model tried.",
    )
    weight_method: Literal["MAX_ABS", "ADMM"] = Field(
        "MAX_ABS", description="How int8 weight scales are chosen (MNN's weight_quantize_method)."
    )
    per_channel_weights: bool = Field(
        True,
        description="One int8 scale per output channel. MNN's quantizer only implements per-channel weights; "
        "false is rejected rather than silently ignored.",
    )
    qat_epochs: int = Field(10, ge=1, le=1000, description="Mode qat: fine-tune epochs over `calibration`.")
    qat_lr: float = Field(1e-3, gt=0, le=1, description="Mode qat: Adam learning rate of the fine-tune.")
    calibration_ladder: Literal["off", "auto"] = Field(
        "off",
        description="auto (full-int8): try, in order, the spec's own calibration, KL, EMA with batch_size 1, EMA "
        "batch 1 on 4x calibration_samples, EMA batch 1 with feature_clamp_value 100; a setting that crashes the "
        "quantizer or misses the budget is reported and the next is tried; the best that meets the budget is kept. "
        "Each attempt is listed in the result (calibration_attempts).",
    )
    max_attempts_s: float = Field(
        1800, gt=0, le=86400, description="calibration_ladder auto: no new attempt starts after this many seconds."
    )
    calibration_samples: int = Field(
        100, ge=1, le=100_000, description="Use at most this many calibration samples (MNN's used_sample_num)."
    )
    batch_size: int = Field(
        8, ge=1, le=1024, description="Calibration batch size for activation_method EMA (MNN's batch_size)."
    )
    skip_layers: tuple[str, ...] = Field(
        (),
        description="MNN op names to keep in float (MNN's skip_quant_op_names); the sensitivity table lists them.",
    )
    mixed_precision: Literal["off", "auto"] = Field(
        "off",
        description="auto: if full int8 misses the budget, keep the most sensitive layers in float, one more at a "
        "time, until it is met (implies `sensitivity`); fails when even all layers in float miss it.",
    )
    sensitivity: bool = Field(
        False,
        description="Measure each quantizable layer alone in int8 and publish the table as sensitivity.md "
        "(one quantization + evaluation per layer).",
    )
    max_accuracy_drop: float = max_accuracy_drop_field(
        0.5, "vs the fp32 model on the evaluation set", "Used when the evaluation set has labels."
    )
    fidelity: Tolerance = Field(
        Tolerance(max_abs_error=None, min_cosine=0.99, min_top1_agreement=0.95),
        description="Output agreement with the fp32 model required when the evaluation set has no labels (or the "
        "output is not classification); `output_kind` picks the agreement checked (per-pixel for dense maps, "
        "nearest-neighbour for embeddings). max_abs_error is checked only when given.",
    )
    max_size_ratio: float | None = Field(
        None,
        gt=0,
        description="Largest allowed size of model.mnn over the fp32 .mnn (1.0: never larger). Full int8 of a tiny "
        "Conv/MatMul model can come out larger than fp32 (scales and float bias per layer); None: only warned about.",
    )
    threads: int = Field(1, ge=1, le=256, description="CPU threads for running the models during evaluation.")
    timeout_s: float = Field(1800, gt=0, le=86400, description="Limit for each converter / quantizer run, seconds.")

    @field_validator("activation_method")
    @classmethod
    def _activation(cls, v: str) -> str:
        if v == "ADMM":
            raise ValueError(_ADMM_CRASH)
        return v

    @field_validator("per_channel_weights")
    @classmethod
    def _per_channel(cls, v: bool) -> bool:
        if not v:
            raise ValueError(
                "per_channel_weights false is not available: MNN's quantizer always scales conv weights per "
                "output channel"
            )
        return v

    @field_validator("skip_layers")
    @classmethod
    def _skip(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(not name.strip() for name in v):
            raise ValueError("skip_layers entries must be non-empty op names")
        if len(set(v)) != len(v):
            raise ValueError("skip_layers has duplicates")
        return v

    @model_validator(mode="after")
    def _mode_fields(self) -> Spec:
        """Every rule of _MODE_FIELDS, _MODE_MODEL_FORMATS, _MODE_WEIGHTS and _SINGLE_INPUT_ONLY; all
        problems in one message."""
        mode, problems, flagged = self.mode, [], set()
        formats, wrong_format = _MODE_MODEL_FORMATS[mode]
        if formats is not None and self.model.format not in formats:
            what = "an .mnn" if self.model.format == "mnn" else f"a {self.model.format} model"
            problems.append(wrong_format.format(what=what))
        for field, uses in _MODE_FIELDS.items():
            use, value = uses[mode], getattr(self, field)
            if use in ("required", "required*") and value is None and not (use == "required*" and self.inputs is not None):
                unless = " unless inputs is given" if use == "required*" else ""
                why = _REQUIRED_FOR.get((field, mode))
                problems.append(f"{field} is required for mode '{mode}'{unless}" + (f" ({why})" if why else ""))
            elif use == "rejected" and value != type(self).model_fields[field].default:
                problems.append(f"{field} applies to {_modes_using(field)}, not {mode}")
                flagged.add(field)
        if mode in _MODE_WEIGHTS and self.weights is not None:
            key, _, need = _MODE_WEIGHTS[mode]
            if getattr(self.weights, key) in (None, False):
                problems.append(f"mode '{mode}' needs {need}")
        if self.inputs is not None:
            for field, why in _SINGLE_INPUT_ONLY.items():
                set_here = getattr(self, field) != type(self).model_fields[field].default
                if set_here and field not in flagged and why not in problems:
                    problems.append(why)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _inputs(self) -> Spec:
        if self.inputs is not None:
            if self.input is not None:
                raise ValueError("give either input (one input) or inputs (every input), not both")
            names = [t.name for t in self.inputs]
            if len(set(names)) != len(names):
                raise ValueError(f"inputs names must be unique, got {names}")
        if self.model.is_torch and self.input is None and self.inputs is None:
            raise ValueError("input (name and shape) is required to export a torch model")
        return self


class CalibrationAttempt(BaseModel):
    """One calibration setting tried by calibration_ladder auto."""

    model_config = ConfigDict(extra="forbid")

    setting: str = Field(description="The quantizer settings, e.g. 'EMA batch_size 1, 100 samples'.")
    outcome: Literal["passed", "missed budget", "crashed", "refused", "not started: time budget"] = Field(
        description="What happened: refused = a known quantizer crash for this model, not run."
    )
    cosine: float | None = Field(None, description="Output cosine vs fp32 on the evaluation set.")
    accuracy_drop_pp: float | None = Field(None, description="Accuracy drop in percentage points (labelled evaluation).")
    seconds: float = Field(0.0, description="Wall time of quantization and evaluation.")
    detail: str = Field("", description="Why it crashed, was refused or missed the budget.")


class Result(StepResult):
    kind: Literal["quantize"] = "quantize"
    mode: str = Field(description="The mode that produced model.mnn.")
    fp32_size_bytes: int = Field(description="Bytes of the fp32 .mnn.")
    size_bytes: int = Field(description="Bytes of the quantized model.mnn.")
    size_ratio: float = Field(description="size_bytes / fp32_size_bytes.")
    op_types: dict[str, int] = Field(description="Op counts of model.mnn; full-int8 convs appear as Convolution[int8].")
    float_layers: list[str] = Field(default_factory=list, description="Layers kept in float (skip_layers + auto).")
    fp32: Evaluation = Field(description="The fp32 .mnn on the evaluation set (cosine 1 by definition).")
    quantized: Evaluation = Field(description="The published model on the evaluation set, vs the fp32 model.")
    sensitivity: list[LayerSensitivity] | None = Field(None, description="Per-layer table, most sensitive first.")
    attempts: int = Field(1, description="Quantizations evaluated for the budget (more than 1 in auto mode).")
    warnings: list[str] = Field(default_factory=list, description="What the user should know, e.g. a model larger than fp32.")
    calibration_attempts: list[CalibrationAttempt] = Field(
        default_factory=list, description="calibration_ladder auto: every calibration setting tried, in order."
    )


# --------------------------------------------------------------------------- model plumbing


def _model_input(mnn_path: Path) -> tuple[str, tuple[int, ...]]:
    """The single input's name and static shape, read from the .mnn's op list (no weights loaded)."""
    from ..engines.mnn_file import MnnFileError, read_inputs

    try:
        inputs = read_inputs(mnn_path)
    except MnnFileError as exc:
        raise InputError(f"not a loadable MNN model: {mnn_path} ({exc})") from None
    names = list(inputs)
    if len(names) != 1:
        raise InputError(f"model has {len(names)} inputs {names}; quantize calibrates single-input models")
    shape = tuple(int(d) for d in inputs[names[0]])
    if shape and shape[0] <= 0:
        shape = (1, *shape[1:])  # a dynamic batch: the quantizer and evaluation feed one sample at a time
    if not shape or any(d <= 0 for d in shape):
        raise InputError(f"model input '{names[0]}' has no static shape ({list(shape)}); export it with a fixed shape")
    return names[0], shape


def _source_inputs(spec: Spec, src: Path) -> list[TensorSpec]:
    """The input the convert step exports/verifies with: the spec's, or the ONNX graph's own."""
    if spec.inputs is not None:
        return list(spec.inputs)
    if spec.input is not None:
        return [spec.input]
    import onnx

    try:
        graph = onnx.load(str(src), load_external_data=False).graph
    except Exception as exc:  # onnx raises DecodeError and others for non-ONNX bytes
        raise InputError(f"{spec.model.uri}: not a readable ONNX model ({type(exc).__name__})") from None
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise InputError(f"{spec.model.uri}: has {len(inputs)} inputs; quantize calibrates single-input models")
    from .convert import _ONNX_DTYPES

    dims = [d.dim_value if d.dim_value > 0 else 1 for d in inputs[0].type.tensor_type.shape.dim]
    # the graph's element type: int64 token ids exported and verified as floats fail in ONNX Runtime
    dtype = _ONNX_DTYPES.get(inputs[0].type.tensor_type.elem_type, "float32")
    return [TensorSpec(name=inputs[0].name, shape=tuple(dims), dtype=dtype)]


def _to_mnn(spec: Spec, ctx, name: str, weights: WeightCompression | None = None) -> Path:
    """The model as .mnn: fp32 (weights None), or with converter weight compression.

    Runs the convert step's own `run` (export, conversion, its verification against the source)
    in a private context; this step then applies its own budget to the result.
    """
    from . import convert

    src = ctx.local(spec.model.uri)
    if spec.model.format == "mnn" and weights is None:
        dst = ctx.scratch("fp32") / "model.mnn"
        shutil.copyfile(src, dst)
        return dst
    sub = ctx.child(f"convert-{name}")
    loose = Tolerance(max_abs_error=None, min_cosine=-1.0, min_top1_agreement=0.0)  # our budget decides
    convert_spec = convert.Spec(
        output=str(sub.outdir),
        model=spec.model,
        inputs=_source_inputs(spec, src),
        dynamic_batch=False,
        weights=weights or WeightCompression(),
        tolerance=Tolerance(output_kind=spec.fidelity.output_kind) if weights is None else loose,
        timeout_s=spec.timeout_s,
        seed=spec.seed,
    )
    convert.run(convert_spec, sub)
    return sub.outdir / convert.MNN_FILE


class _Evaluator:
    """Runs candidate .mnn models on the evaluation set and compares them with the fp32 model."""

    def __init__(
        self, fp32_path: Path, x: np.ndarray, y: np.ndarray | None, threads: int, timeout_s: float = 1800,
        kind: str = "classification",
    ):
        from ..engines.measure import MeasureServer

        self.x, self.y, self.threads, self.kind = x, y, threads, kind
        self.sample_shape: tuple[int, ...] = ()
        # Each candidate runs in a confined process of its own (MNN parses the file in C++), forked
        # from one server that imports MNN once; one timed run is the price of reusing it.
        self._server = MeasureServer(
            settings=[(threads, 1)], timing_inputs={1: [x[:1]]}, eval_inputs=[x], warmup=0, iterations=1, timeout_s=timeout_s
        )
        self.reference = self.outputs(fp32_path)
        # labels are class indices: only a classifier's argmax can be scored against them
        labelled = y is not None and kind == "classification"
        self.fp32_accuracy = float((self.reference.argmax(1) == y).mean()) if labelled else None

    def close(self) -> None:
        self._server.close()

    def outputs(self, path: Path) -> np.ndarray:
        m = self._server.measure(ModelRef(uri=str(path), format="mnn"), path)
        assert m.eval_outputs is not None
        self.sample_shape = np.asarray(m.eval_outputs[0]).shape  # a dense map's [C, H, W] for verify.compare
        return np.stack([np.asarray(o, np.float64).reshape(-1) for o in m.eval_outputs])

    def evaluate(self, path: Path) -> Evaluation:
        from ..verify import compare

        out = self.outputs(path)
        ref = self.reference
        shape = self.sample_shape
        fid = compare([r.reshape(shape) for r in ref], [o.reshape(shape) for o in out], self.kind)  # type: ignore[arg-type]
        agreement = fid.top1_agreement
        if self.fp32_accuracy is None or ref.shape[1] <= 1:
            return Evaluation(cosine=fid.cosine, top1_agreement=agreement, fidelity=fid)
        acc = float((out.argmax(1) == self.y).mean())
        return Evaluation(
            cosine=fid.cosine, accuracy=acc, accuracy_drop_pp=accuracy_drop_pp(self.fp32_accuracy, acc),
            top1_agreement=agreement, fidelity=fid,
        )


def _within(spec: Spec, ev: Evaluation) -> bool:
    return not _budget_problems(spec, ev)


def _budget_problems(spec: Spec, ev: Evaluation) -> list[str]:
    if ev.accuracy_drop_pp is not None:
        if exceeds_accuracy_budget(ev.accuracy_drop_pp, spec.max_accuracy_drop):
            return [f"accuracy drop {ev.accuracy_drop_pp:.2f} pp > max_accuracy_drop {spec.max_accuracy_drop} pp"]
        return []
    from ..verify import violations

    assert ev.fidelity is not None, "every evaluation of a candidate carries its fidelity"
    tol = spec.fidelity
    if "max_abs_error" not in tol.model_fields_set:  # int8 always moves outputs by more than fp32's default
        tol = tol.model_copy(update={"max_abs_error": None})
    return violations(ev.fidelity, tol)


def _size_warnings(spec: Spec, fp32_size: int, size: int) -> list[str]:
    """Refuse a model over `max_size_ratio` (StepFailed, nothing published); warn when it is larger than fp32."""
    ratio = size / fp32_size
    if spec.max_size_ratio is not None and ratio > spec.max_size_ratio:
        raise StepFailed(
            f"{spec.mode} model.mnn is {size:,} B, {ratio:.2f}x the fp32 .mnn ({fp32_size:,} B) > max_size_ratio "
            f"{spec.max_size_ratio}; nothing published"
        )
    if ratio <= 1.0:
        return []
    warning = (
        f"{spec.mode} model.mnn ({size:,} B) is LARGER than the fp32 .mnn ({fp32_size:,} B), {ratio:.2f}x: per-layer "
        "scales and float biases outweigh the int8 weights of a model this small (set max_size_ratio to refuse it)"
    )
    logging.getLogger("mnnpipe").warning(warning)
    return [warning]


def _miss(spec: Spec, ev: Evaluation) -> str:
    """Why `ev` misses the budget, then every metric measured (not only the one that failed)."""
    from ..verify import describe

    return f"{'; '.join(_budget_problems(spec, ev))}; measured: {describe(ev.fidelity)}"


# --------------------------------------------------------------------------- full int8


class _Int8Quantizer:
    """One MNN quantizer run per skip list, cached so the search never repeats a quantization."""

    def __init__(
        self, spec: Spec, fp32: Path, calib_config: dict, workdir: Path, evaluator: _Evaluator | None,
        overrides: dict | None = None,
    ):
        self.spec, self.fp32, self.workdir, self.evaluator = spec, fp32, workdir, evaluator
        self.base_config = {
            **calib_config,
            "feature_quantize_method": spec.activation_method,
            "weight_quantize_method": spec.weight_method,
        }
        if spec.activation_method == "EMA":
            self.base_config["batch_size"] = spec.batch_size
        self.base_config.update(overrides or {})
        self.runs: dict[tuple[str, ...], tuple[Path, Evaluation]] = {}

    def quantize(self, skip: list[str], *, debug: bool = False) -> tuple[Path, str]:
        from ..engines.mnn import quantize_int8

        dst = self.workdir / f"int8-{len(self.runs) + int(debug) * 100000:05d}.mnn"
        config = {**self.base_config, "skip_quant_op_names": list(skip)}
        if debug:
            config["debug"] = True
        try:
            log = quantize_int8(self.fp32, dst, config, timeout_s=self.spec.timeout_s)
        except ToolError as exc:
            if "Reshape error" in str(exc) and config.get("batch_size", 1) > 1:
                raise ToolError(f"{exc} (EMA calibration at batch_size {config['batch_size']}: use batch_size: 1)") from None
            raise
        return dst, log

    def evaluate(self, skip: list[str]) -> Evaluation:
        key = tuple(sorted(skip))
        if key not in self.runs:
            path, _ = self.quantize(list(skip))
            assert self.evaluator is not None  # the multi-input path quantizes once and checks itself
            self.runs[key] = (path, self.evaluator.evaluate(path))
        return self.runs[key][1]

    def path(self, skip: list[str]) -> Path:
        return self.runs[tuple(sorted(skip))][0]


def _refuse_blocked(spec: Spec, fp32: Path) -> None:
    """InputError for a model the quantizer is known to crash on with the spec's activation method;
    checked before calibration data is written (the quantizer would only segfault)."""
    from ..engines.mnn import quantizer_blockers

    blockers = quantizer_blockers(fp32, spec.activation_method)
    if blockers:
        raise InputError(f"model: {spec.model.uri}: {'; '.join(blockers)}")


def _quantizable_layers(spec: Spec, fp32: Path) -> list[tuple[str, str]]:
    """The model's quantizable layers; InputError when `skip_layers` names others."""
    from ..sensitivity import quantizable_layers

    layers = quantizable_layers(str(fp32))
    known = {n for n, _ in layers}
    unknown = [s for s in spec.skip_layers if s not in known]
    if unknown:
        raise InputError(f"skip_layers: {unknown} are not quantizable layers of this model; it has {sorted(known)}")
    return layers


def _debug_cosines(quantizer: _Int8Quantizer, skip: list[str]) -> dict[str, float]:
    from ..engines.mnn import parse_debug_distances

    _, log = quantizer.quantize(skip, debug=True)
    return {r["op"]: r["cosine"] for r in parse_debug_distances(log) if r["tensor"] == "output_tensor_0"}


def _full_int8(
    spec: Spec, ctx, fp32: Path, evaluator: _Evaluator
) -> tuple[Path, Evaluation, list[str], list[LayerSensitivity] | None, int, list[CalibrationAttempt]]:
    from ..calibration import write_calibration
    from ..sensitivity import greedy_float_layers, measure

    assert spec.calibration is not None  # the validator guarantees it
    name, shape = _model_input(fp32)
    ladder = spec.calibration_ladder == "auto"
    if not ladder:  # the ladder tries other activation methods: it checks each rung itself
        _refuse_blocked(spec, fp32)
    ref = spec.calibration
    data = ctx.dataset(ref, "calibration")
    # the ladder's "more samples" rung reads up to 4x calibration_samples from the same folder
    limit = spec.calibration_samples * (_MORE_SAMPLES if ladder else 1)
    calib = write_calibration(data, ctx.scratch("calibration"), ref.preprocess, input_name=name, input_shape=shape, limit=limit)
    layers = _quantizable_layers(spec, fp32)
    skip = list(spec.skip_layers)
    tried: list[CalibrationAttempt] = []
    if ladder:
        quantizer, tried = _calibration_ladder(spec, ctx, fp32, calib, evaluator, skip)
    else:
        quantizer = _Int8Quantizer(spec, fp32, calib.config, ctx.scratch("int8"), evaluator)
    first = quantizer.evaluate(skip)
    table = None
    needs_search = spec.mixed_precision == "auto" and not _within(spec, first)
    if spec.sensitivity or needs_search:
        cosines = _debug_cosines(quantizer, skip)
        table = measure(
            layers,
            quantizer.evaluate,
            always_skip=skip,
            debug_cosines=cosines,
            progress=lambda it: list(ctx.progress(it, "sensitivity", total=len(it))),
        )
    if needs_search:
        assert table is not None
        skip, first, attempts = greedy_float_layers(table, quantizer.evaluate, lambda ev: _within(spec, ev), always_skip=skip)
        if not _within(spec, first):
            raise StepFailed(
                f"full-int8 misses the budget even with all {len(skip)} quantizable layers kept in float: "
                f"{_miss(spec, first)}; nothing published"
            )
    return quantizer.path(skip), first, skip, table, len(quantizer.runs), tried


_MORE_SAMPLES = 4  # the ladder's "more samples" rung: this many times calibration_samples
_CLAMP = 100  # the ladder's clamping rung: feature_clamp_value (MNN's default is 127)


def _ladder_settings(spec: Spec, available: int) -> list[tuple[str, dict]]:
    """(description, quantizer config overrides) in the order the ladder tries them."""
    n = min(spec.calibration_samples, available)
    more = min(spec.calibration_samples * _MORE_SAMPLES, available)
    own = {"feature_quantize_method": spec.activation_method, "used_n": n}
    if spec.activation_method == "EMA":
        own["batch_size"] = spec.batch_size
    rungs = [
        own,
        {"feature_quantize_method": "KL", "used_n": n},
        {"feature_quantize_method": "EMA", "batch_size": 1, "used_n": n},
        {"feature_quantize_method": "EMA", "batch_size": 1, "used_n": more},
        {"feature_quantize_method": "EMA", "batch_size": 1, "used_n": n, "feature_clamp_value": _CLAMP},
    ]
    out, seen = [], set()
    for r in rungs:
        key = tuple(sorted(r.items()))
        if key in seen:
            continue
        seen.add(key)
        text = r["feature_quantize_method"]
        if "batch_size" in r:
            text += f" batch_size {r['batch_size']}"
        text += f", {r['used_n']} samples"
        if "feature_clamp_value" in r:
            text += f", feature_clamp_value {r['feature_clamp_value']}"
        out.append((text, r))
    return out


def _calibration_ladder(
    spec: Spec, ctx, fp32: Path, calib, evaluator: _Evaluator, skip: list[str]
) -> tuple[_Int8Quantizer, list[CalibrationAttempt]]:
    """Try each calibration setting within max_attempts_s; the best that meets the budget wins
    (with mixed_precision auto, the best that ran, for the layer search to rescue)."""
    import time

    from ..engines.mnn import quantizer_blockers

    count_key = "used_image_num" if calib.layout == "images" else "used_sample_num"
    start = time.monotonic()
    tried: list[CalibrationAttempt] = []
    ran: list[tuple[_Int8Quantizer, Evaluation, bool]] = []
    for i, (text, rung) in enumerate(_ladder_settings(spec, calib.samples)):
        if time.monotonic() - start > spec.max_attempts_s:
            tried.append(CalibrationAttempt(setting=text, outcome="not started: time budget"))
            continue
        blockers = quantizer_blockers(fp32, rung["feature_quantize_method"])
        if blockers:
            tried.append(CalibrationAttempt(setting=text, outcome="refused", detail="; ".join(blockers)))
            continue
        overrides = {k: v for k, v in rung.items() if k != "used_n"}
        overrides[count_key] = rung["used_n"]
        t0 = time.monotonic()
        quantizer = _Int8Quantizer(spec, fp32, calib.config, ctx.scratch(f"int8-{i}"), evaluator, overrides)
        try:
            ev = quantizer.evaluate(skip)
        except ToolError as exc:
            tried.append(CalibrationAttempt(setting=text, outcome="crashed", seconds=round(time.monotonic() - t0, 3), detail=str(exc)[:300]))
            continue
        problems = _budget_problems(spec, ev)
        tried.append(
            CalibrationAttempt(
                setting=text,
                outcome="missed budget" if problems else "passed",
                cosine=ev.cosine,
                accuracy_drop_pp=ev.accuracy_drop_pp,
                seconds=round(time.monotonic() - t0, 3),
                detail="; ".join(problems),
            )
        )
        ran.append((quantizer, ev, not problems))
    report = " | ".join(f"{a.setting}: {a.outcome}" + (f" ({a.detail})" if a.detail else "") for a in tried)
    candidates = [r for r in ran if r[2]] or (ran if spec.mixed_precision == "auto" else [])
    if not candidates:
        raise StepFailed(f"full-int8: no calibration setting meets the budget; tried {report}; nothing published")
    best = min(candidates, key=lambda r: ((r[1].accuracy_drop_pp or 0.0), -r[1].cosine))
    return best[0], tried


# --------------------------------------------------------------------------- the step


def run(spec: Spec, ctx) -> Result:
    from ..sensitivity import to_markdown

    if spec.model.format == "mnn":  # before this process reads it: a corrupt .mnn can hang or crash MNN
        from ..engines.mnn_probe import PROBE_TIMEOUT_S, check_loadable

        check_loadable(ctx.local(spec.model.uri), f"model: {spec.model.uri}", timeout_s=min(spec.timeout_s, PROBE_TIMEOUT_S))
    fp32 = _to_mnn(spec, ctx, "fp32")
    if spec.inputs is not None:
        return _multi_input(spec, ctx, fp32, list(spec.inputs))
    if spec.evaluation is None:  # weight-only / fp16 without an evaluation set: random inputs
        return _multi_input(spec, ctx, fp32, _source_inputs(spec, ctx.local(spec.model.uri)))
    try:
        name, shape = _model_input(fp32)
    except InputError as exc:  # name the spec's model, not the scratch copy the message would show
        msg = str(exc)
        msg = msg.replace(str(fp32), spec.model.uri) if str(fp32) in msg else f"{spec.model.uri}: {msg}"
        raise InputError(f"model: {msg}") from None
    assert spec.evaluation is not None  # the validator requires it without `inputs`
    ev_data = ctx.dataset(spec.evaluation, "evaluation")
    from ..calibration import check_matches_input

    check_matches_input(ev_data, shape, name, "evaluation")
    evaluator = _Evaluator(fp32, ev_data.x, ev_data.y, spec.threads, spec.timeout_s, spec.fidelity.output_kind)

    table, skip, attempts, tried = None, [], 1, []
    try:
        if spec.mode == "full-int8":
            candidate, ev, skip, table, attempts, tried = _full_int8(spec, ctx, fp32, evaluator)
        elif spec.mode == "qat":
            candidate, skip = _qat(spec, ctx, name, shape)
            ev = evaluator.evaluate(candidate)
        else:
            weights = spec.weights or _default_weights(spec.mode)
            candidate = _to_mnn(spec, ctx, spec.mode, weights)
            ev = evaluator.evaluate(candidate)
    finally:  # the evaluation server's child holds MNN: never leave it behind
        evaluator.close()

    fp32_ev = Evaluation(
        cosine=1.0,
        accuracy=evaluator.fp32_accuracy,
        accuracy_drop_pp=None if evaluator.fp32_accuracy is None else 0.0,
        top1_agreement=1.0 if ev.top1_agreement is not None else None,
    )
    metrics: dict[str, float] = {}
    for i, a in enumerate(tried):
        metrics[f"calibration_attempt_{i}_passed"] = float(a.outcome == "passed")
        metrics[f"calibration_attempt_{i}_seconds"] = a.seconds
        if a.cosine is not None:
            metrics[f"calibration_attempt_{i}_cosine"] = a.cosine
    for field in ("top1_agreement", "neighbour_agreement", "pixel_agreement", "mean_iou"):
        if ev.fidelity is not None and getattr(ev.fidelity, field) is not None:
            metrics[field] = getattr(ev.fidelity, field)
    if ev.accuracy is not None:
        metrics.update(accuracy=ev.accuracy, fp32_accuracy=float(evaluator.fp32_accuracy), accuracy_drop_pp=float(ev.accuracy_drop_pp))
    result = _publish(
        spec, ctx, fp32, candidate, ev, skip, fp32_ev=fp32_ev, metrics=metrics, sensitivity=table, attempts=attempts,
        calibration_attempts=tried,
    )  # fmt: skip
    if table is not None:
        (ctx.outdir / "sensitivity.md").write_text(to_markdown(table, skip))
    return result


def _publish(
    spec: Spec, ctx, fp32: Path, candidate: Path, ev: Evaluation, skip: list[str], *, where: str = "", fp32_ev: Evaluation,
    metrics: dict[str, float] | None = None, **result: object,
) -> Result:
    """The end of every mode: refuse a candidate that misses the budget (`where` says on what it
    was measured), has no int8 layer in an int8 mode or is over max_size_ratio; else copy it to
    model.mnn and describe it. `metrics` and `result` add to the common metrics and Result fields."""
    from ..engines.mnn import op_types

    if _budget_problems(spec, ev):
        raise StepFailed(f"{spec.mode} model misses the budget: {_miss(spec, ev)}{where}; nothing published")
    ops = op_types(candidate, timeout_s=spec.timeout_s)
    if spec.mode in ("full-int8", "qat") and not any(k.endswith("[int8]") for k in ops):
        raise StepFailed(f"the quantizer produced no int8 layers (op types {ops}); nothing published")
    fp32_size, size = fp32.stat().st_size, candidate.stat().st_size
    warnings = _size_warnings(spec, fp32_size, size)
    shutil.copyfile(candidate, ctx.outdir / "model.mnn")
    return Result(
        mode=spec.mode,
        fp32_size_bytes=fp32_size,
        size_bytes=size,
        size_ratio=round(size / fp32_size, 6),
        op_types=ops,
        float_layers=skip,
        fp32=fp32_ev,
        quantized=ev,
        warnings=warnings,
        metrics={"size_ratio": size / fp32_size, "cosine": ev.cosine, "float_layers": float(len(skip)), **(metrics or {})},
        **result,
    )


def _multi_input(spec: Spec, ctx, fp32: Path, inputs: list[TensorSpec]) -> Result:
    """A model checked on seeded random inputs (every input): several inputs in any mode, or a
    weight-only / fp16 model without an evaluation set."""
    from ..engines.mnn import load_session
    from ..stepkit import random_inputs
    from ..verify import compare

    names = [t.name for t in inputs]
    skip: list[str] = []
    if spec.mode == "full-int8":
        candidate, skip = _multi_input_int8(spec, ctx, fp32)
    else:
        candidate = _to_mnn(spec, ctx, spec.mode, spec.weights or _default_weights(spec.mode))
    samples = random_inputs(inputs, spec.num_samples, spec.seed)
    output_names = load_session(fp32, threads=spec.threads, input_names=names).output_names

    def outputs(path: Path) -> list[np.ndarray]:
        # by name: the int8 .mnn may list its outputs in another order than the fp32 one
        session = load_session(path, threads=spec.threads, input_names=names, output_names=output_names)
        runs = [session.run(s) for s in samples]
        if len(runs[0]) == 1:  # one output keeps its shape: a dense map's [C, H, W] is judged per pixel
            return [np.asarray(r[0], np.float64) for r in runs]
        return [np.concatenate([np.asarray(o, np.float64).reshape(-1) for o in r]) for r in runs]

    # Without a kind in the spec, cosine only ("other"): the outputs of a multi-input model are
    # rarely class scores (embeddings, spans), and an argmax over them flips on noise.
    kind = spec.fidelity.output_kind if "output_kind" in spec.fidelity.model_fields_set else "other"
    fid = compare(outputs(fp32), outputs(candidate), kind)
    ev = Evaluation(cosine=fid.cosine, top1_agreement=fid.top1_agreement, fidelity=fid)
    return _publish(spec, ctx, fp32, candidate, ev, skip, where=", on seeded random inputs", fp32_ev=Evaluation(cosine=1.0))


def _multi_input_int8(spec: Spec, ctx, fp32: Path) -> tuple[Path, list[str]]:
    """Full int8 of a model with several inputs: every sample carries every input (MNN's sequence
    layout), from the calibration npz or seeded random inputs within each input's range."""
    from ..calibration import write_multi_input_calibration
    from ..data import load_named_samples
    from ..stepkit import random_inputs

    assert spec.inputs is not None
    inputs = list(spec.inputs)
    _refuse_blocked(spec, fp32)
    ref = spec.calibration
    if ref is None:  # another seed than the check's: the model is not checked on its calibration data
        samples = random_inputs(inputs, spec.calibration_samples, spec.seed + 1)
    else:
        samples = load_named_samples(ref, ctx.dataset_path(ref), inputs)[: spec.calibration_samples]
    calib = write_multi_input_calibration(samples, inputs, ctx.scratch("calibration"))
    _quantizable_layers(spec, fp32)
    quantizer = _Int8Quantizer(spec, fp32, calib.config, ctx.scratch("int8"), evaluator=None)
    path, _ = quantizer.quantize(list(spec.skip_layers))
    return path, list(spec.skip_layers)


def _qat(spec: Spec, ctx, name: str, shape: tuple[int, ...]) -> tuple[Path, list[str]]:
    """Quantization-aware fine-tune on the labelled calibration set, converted with its int8 scales."""
    from ..calibration import check_matches_input
    from ..qat import quantize_aware

    assert spec.calibration is not None  # the validator guarantees it
    train = ctx.dataset(spec.calibration, "calibration")
    check_matches_input(train, shape, name, "calibration")
    model = ctx.torch_model(spec.model)
    return quantize_aware(
        model, train, name, shape, ctx.scratch("qat"), epochs=spec.qat_epochs, lr=spec.qat_lr, seed=spec.seed, timeout_s=spec.timeout_s
    )


def _default_weights(mode: str) -> WeightCompression:
    return _MODE_WEIGHTS[mode][1]


register(name="quantize", spec=Spec, result=Result, run=run, stage="quantize", model_input="model", hands_on=HandOff("model.mnn", "mnn"))
