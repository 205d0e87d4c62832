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
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from ..errors import InputError, SpecError, StepFailed
from ..sensitivity import Evaluation, LayerSensitivity
from ..specs import DatasetRef, ModelRef, StepResult, StepSpec, TensorSpec, Tolerance
from .convert import WeightCompression

# Measured on MNN 3.6.1 (see benchmarks/results/quantize.md): ADMM activation calibration
# crashes the quantizer (SIGSEGV / "corrupted size vs. prev_size") on every model we tried.
_ADMM_CRASH = (
    "activation_method 'ADMM' crashes MNN 3.6.1's quantizer (SIGSEGV / heap corruption, measured on "
    "the digits CNN and MobileNetV2); use 'KL' or 'EMA'"
)


class Spec(StepSpec):
    """Quantize a model for MNN: full int8 (calibrated), weight-only int8/int4, or fp16."""

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
        16, ge=1, le=4096, description="Random inputs the multi-input check (`inputs`) compares the models on."
    )
    mode: Literal["full-int8", "qat", "weight-only", "fp16"] = Field(
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
        description="Required unless `inputs` is given. ""Held-out set the quantized model is measured on against the fp32 model: top-1 accuracy "
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
    max_accuracy_drop: float = Field(
        0.5,
        ge=0,
        le=100,
        description="Largest allowed top-1 accuracy drop vs the fp32 model, in PERCENTAGE POINTS on the "
        "evaluation set (0.5: 97.5% -> at least 97.0%). Used when the evaluation set has labels.",
    )
    fidelity: Tolerance = Field(
        Tolerance(max_abs_error=None, min_cosine=0.99, min_top1_agreement=0.95),
        description="Output agreement with the fp32 model required when the evaluation set has no labels.",
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
        if self.mode == "qat":
            if self.model.format != "state-dict":
                raise ValueError("mode 'qat' fine-tunes the torch model: give a state-dict (.pth) with its factory")
            if self.calibration is None:
                raise ValueError("calibration is required for mode 'qat' (the labelled set the fine-tune trains on)")
            if self.inputs is not None or self.weights is not None or self.skip_layers:
                raise ValueError("mode 'qat' takes one `input`; inputs, weights and skip_layers do not apply")
            if self.mixed_precision != "off" or self.sensitivity:
                raise ValueError("sensitivity and mixed_precision apply to mode full-int8 only")
        elif self.mode == "full-int8":
            if self.calibration is None and self.inputs is None:
                raise ValueError("calibration is required for mode 'full-int8' (a DatasetRef to calibrate on)")
            if self.weights is not None:
                raise ValueError("weights applies to modes weight-only / fp16, not full-int8")
        else:
            if self.model.format == "mnn":
                raise ValueError(
                    f"mode '{self.mode}' is applied by the converter, which reads torch or ONNX models; "
                    "give the source model, not an .mnn"
                )
            for name in ("calibration", "skip_layers"):
                if getattr(self, name):
                    raise ValueError(f"{name} applies to mode full-int8 only")
            if self.mixed_precision != "off" or self.sensitivity:
                raise ValueError("sensitivity and mixed_precision apply to mode full-int8 only")
            if self.weights is not None and self.mode == "fp16" and not self.weights.fp16:
                raise ValueError("mode 'fp16' needs weights.fp16 true (or omit weights)")
            if self.weights is not None and self.mode == "weight-only" and self.weights.bits is None:
                raise ValueError("mode 'weight-only' needs weights.bits (2-8), or omit weights for 8 bits")
        if self.inputs is not None:
            if self.input is not None:
                raise ValueError("give either input (one input) or inputs (every input), not both")
            if self.mode == "full-int8" and (self.mixed_precision != "off" or self.sensitivity):
                raise ValueError("sensitivity and mixed_precision measure single-input models; with inputs use skip_layers")
            if self.evaluation is not None:
                raise ValueError("evaluation feeds one input; with inputs the check uses random inputs: omit evaluation")
            names = [t.name for t in self.inputs]
            if len(set(names)) != len(names):
                raise ValueError(f"inputs names must be unique, got {names}")
        elif self.evaluation is None:
            raise ValueError("evaluation is required (a held-out DatasetRef) unless inputs is given")
        if self.model.is_torch and self.input is None and self.inputs is None:
            raise ValueError("input (name and shape) is required to export a torch model")
        return self


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
    dims = [d.dim_value if d.dim_value > 0 else 1 for d in inputs[0].type.tensor_type.shape.dim]
    return [TensorSpec(name=inputs[0].name, shape=tuple(dims))]


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
        tolerance=Tolerance() if weights is None else loose,
        timeout_s=spec.timeout_s,
        seed=spec.seed,
    )
    convert.run(convert_spec, sub)
    return sub.outdir / convert.MNN_FILE


class _Evaluator:
    """Runs candidate .mnn models on the evaluation set and compares them with the fp32 model."""

    def __init__(self, fp32_path: Path, x: np.ndarray, y: np.ndarray | None, threads: int, timeout_s: float = 1800):
        from ..engines.runtimes import MeasureServer

        self.x, self.y, self.threads = x, y, threads
        # Each candidate runs in a confined process of its own (MNN parses the file in C++), forked
        # from one server that imports MNN once; one timed run is the price of reusing it.
        self._server = MeasureServer(
            settings=[(threads, 1)], timing_inputs={1: [x[:1]]}, eval_inputs=[x], warmup=0, iterations=1, timeout_s=timeout_s
        )
        self.reference = self.outputs(fp32_path)
        self.fp32_accuracy = None if y is None else float((self.reference.argmax(1) == y).mean())

    def outputs(self, path: Path) -> np.ndarray:
        m = self._server.measure(ModelRef(uri=str(path), format="mnn"), path)
        assert m.eval_outputs is not None
        return np.stack([np.asarray(o, np.float64).reshape(-1) for o in m.eval_outputs])

    def evaluate(self, path: Path) -> Evaluation:
        out = self.outputs(path)
        ref = self.reference
        denom = float(np.linalg.norm(ref) * np.linalg.norm(out))
        cosine = float(np.dot(ref.ravel(), out.ravel()) / denom) if denom > 0 else float(np.allclose(ref, out))
        classifier = ref.shape[1] > 1
        agreement = float((ref.argmax(1) == out.argmax(1)).mean()) if classifier else None
        if self.y is None or not classifier:
            return Evaluation(cosine=cosine, top1_agreement=agreement)
        acc = float((out.argmax(1) == self.y).mean())
        return Evaluation(
            cosine=cosine, accuracy=acc, accuracy_drop_pp=round((self.fp32_accuracy - acc) * 100, 6), top1_agreement=agreement
        )


def _within(spec: Spec, ev: Evaluation) -> bool:
    return not _budget_problems(spec, ev)


def _budget_problems(spec: Spec, ev: Evaluation) -> list[str]:
    if ev.accuracy_drop_pp is not None:
        if ev.accuracy_drop_pp > spec.max_accuracy_drop + 1e-9:
            return [f"accuracy drop {ev.accuracy_drop_pp:.2f} pp > max_accuracy_drop {spec.max_accuracy_drop} pp"]
        return []
    problems = []
    if ev.cosine < spec.fidelity.min_cosine:
        problems.append(f"output cosine {ev.cosine:.6f} < {spec.fidelity.min_cosine}")
    if ev.top1_agreement is not None and ev.top1_agreement < spec.fidelity.min_top1_agreement:
        problems.append(f"top-1 agreement {ev.top1_agreement:.4f} < {spec.fidelity.min_top1_agreement}")
    return problems


# --------------------------------------------------------------------------- full int8


class _Int8Quantizer:
    """One MNN quantizer run per skip list, cached so the search never repeats a quantization."""

    def __init__(self, spec: Spec, fp32: Path, calib_config: dict, workdir: Path, evaluator: _Evaluator | None):
        self.spec, self.fp32, self.workdir, self.evaluator = spec, fp32, workdir, evaluator
        self.base_config = {
            **calib_config,
            "feature_quantize_method": spec.activation_method,
            "weight_quantize_method": spec.weight_method,
        }
        if spec.activation_method == "EMA":
            self.base_config["batch_size"] = spec.batch_size
        self.runs: dict[tuple[str, ...], tuple[Path, Evaluation]] = {}

    def quantize(self, skip: list[str], *, debug: bool = False) -> tuple[Path, str]:
        from ..engines.mnn import quantize_int8

        dst = self.workdir / f"int8-{len(self.runs) + int(debug) * 100000:05d}.mnn"
        config = {**self.base_config, "skip_quant_op_names": list(skip)}
        if debug:
            config["debug"] = True
        log = quantize_int8(self.fp32, dst, config, timeout_s=self.spec.timeout_s)
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


def _debug_cosines(quantizer: _Int8Quantizer, skip: list[str]) -> dict[str, float]:
    from ..engines.mnn import parse_debug_distances

    _, log = quantizer.quantize(skip, debug=True)
    return {r["op"]: r["cosine"] for r in parse_debug_distances(log) if r["tensor"] == "output_tensor_0"}


def _full_int8(spec: Spec, ctx, fp32: Path, evaluator: _Evaluator) -> tuple[Path, Evaluation, list[str], list[LayerSensitivity] | None, int]:
    from ..calibration import write_calibration
    from ..data import load_dataset
    from ..engines.mnn import quantizer_blockers
    from ..sensitivity import greedy_float_layers, measure, quantizable_layers

    assert spec.calibration is not None  # the validator guarantees it
    name, shape = _model_input(fp32)
    blockers = quantizer_blockers(fp32, spec.activation_method)
    if blockers:  # before calibration data is written: the quantizer would only segfault
        raise InputError(f"model: {spec.model.uri}: {'; '.join(blockers)}")
    ref = spec.calibration
    data = load_dataset(ref, ctx.local(ref.uri) if ref.uri else None)
    calib = write_calibration(
        data, ctx.scratch("calibration"), ref.preprocess, input_name=name, input_shape=shape, limit=spec.calibration_samples
    )
    quantizer = _Int8Quantizer(spec, fp32, calib.config, ctx.scratch("int8"), evaluator)
    layers = quantizable_layers(str(fp32))
    known = {n for n, _ in layers}
    unknown = [s for s in spec.skip_layers if s not in known]
    if unknown:
        raise InputError(
            f"skip_layers: {unknown} are not quantizable layers of this model; it has {sorted(known)}"
        )
    skip = list(spec.skip_layers)
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
                f"{'; '.join(_budget_problems(spec, first))}; nothing published"
            )
    return quantizer.path(skip), first, skip, table, len(quantizer.runs)


# --------------------------------------------------------------------------- the step


def run(spec: Spec, ctx) -> Result:
    from ..data import load_dataset
    from ..engines.mnn import op_types
    from ..sensitivity import to_markdown

    if spec.model.format == "mnn":  # before this process reads it: a corrupt .mnn can hang or crash MNN
        from ..engines.mnn_probe import PROBE_TIMEOUT_S, check_loadable

        check_loadable(ctx.local(spec.model.uri), f"model: {spec.model.uri}", timeout_s=min(spec.timeout_s, PROBE_TIMEOUT_S))
    fp32 = _to_mnn(spec, ctx, "fp32")
    if spec.inputs is not None:
        return _multi_input(spec, ctx, fp32)
    try:
        name, shape = _model_input(fp32)
    except InputError as exc:  # name the spec's model, not the scratch copy the message would show
        msg = str(exc)
        msg = msg.replace(str(fp32), spec.model.uri) if str(fp32) in msg else f"{spec.model.uri}: {msg}"
        raise InputError(f"model: {msg}") from None
    ev_ref = spec.evaluation
    assert ev_ref is not None  # the validator requires it without `inputs`
    ev_data = load_dataset(ev_ref, ctx.local(ev_ref.uri) if ev_ref.uri else None)
    from ..calibration import check_matches_input

    check_matches_input(ev_data, shape, name, "evaluation")
    evaluator = _Evaluator(fp32, ev_data.x, ev_data.y, spec.threads, spec.timeout_s)

    table, skip, attempts = None, [], 1
    if spec.mode == "full-int8":
        candidate, ev, skip, table, attempts = _full_int8(spec, ctx, fp32, evaluator)
    elif spec.mode == "qat":
        candidate, skip = _qat(spec, ctx, name, shape)
        ev = evaluator.evaluate(candidate)
    else:
        weights = spec.weights or _default_weights(spec.mode)
        candidate = _to_mnn(spec, ctx, spec.mode, weights)
        ev = evaluator.evaluate(candidate)

    problems = _budget_problems(spec, ev)
    if problems:
        raise StepFailed(f"{spec.mode} model misses the budget: {'; '.join(problems)}; nothing published")

    ops = op_types(candidate, timeout_s=spec.timeout_s)
    if spec.mode in ("full-int8", "qat") and not any(k.endswith("[int8]") for k in ops):
        raise StepFailed(f"the quantizer produced no int8 layers (op types {ops}); nothing published")
    shutil.copyfile(candidate, ctx.outdir / "model.mnn")
    if table is not None:
        (ctx.outdir / "sensitivity.md").write_text(to_markdown(table, skip))
    fp32_size, size = fp32.stat().st_size, candidate.stat().st_size
    fp32_ev = Evaluation(
        cosine=1.0,
        accuracy=evaluator.fp32_accuracy,
        accuracy_drop_pp=None if evaluator.fp32_accuracy is None else 0.0,
        top1_agreement=1.0 if evaluator.reference.shape[1] > 1 else None,
    )
    metrics = {"size_ratio": size / fp32_size, "cosine": ev.cosine, "float_layers": float(len(skip))}
    if ev.accuracy is not None:
        metrics.update(accuracy=ev.accuracy, fp32_accuracy=float(evaluator.fp32_accuracy), accuracy_drop_pp=float(ev.accuracy_drop_pp))
    return Result(
        mode=spec.mode,
        fp32_size_bytes=fp32_size,
        size_bytes=size,
        size_ratio=round(size / fp32_size, 6),
        op_types=ops,
        float_layers=skip,
        fp32=fp32_ev,
        quantized=ev,
        sensitivity=table,
        attempts=attempts,
        metrics=metrics,
    )


def _multi_input(spec: Spec, ctx, fp32: Path) -> Result:
    """A model with several inputs in any mode, checked on seeded random inputs (every input)."""
    from ..engines.mnn import load_session, op_types
    from ..verify import compare
    from .convert import random_inputs

    assert spec.inputs is not None
    names = [t.name for t in spec.inputs]
    skip: list[str] = []
    if spec.mode == "full-int8":
        candidate, skip = _multi_input_int8(spec, ctx, fp32)
    else:
        candidate = _to_mnn(spec, ctx, spec.mode, spec.weights or _default_weights(spec.mode))
    samples = random_inputs(list(spec.inputs), spec.num_samples, spec.seed)

    def outputs(path: Path) -> list[np.ndarray]:
        session = load_session(path, threads=spec.threads, input_names=names)
        return [np.concatenate([np.asarray(o, np.float64).reshape(-1) for o in session.run(s)]) for s in samples]

    fid = compare(outputs(fp32), outputs(candidate))
    # cosine only: the outputs of a multi-input model are rarely class scores (embeddings, spans),
    # and an argmax over them flips on noise
    ev = Evaluation(cosine=fid.cosine)
    problems = _budget_problems(spec, ev)
    if problems:
        raise StepFailed(f"{spec.mode} model misses the budget: {'; '.join(problems)} (over {fid.samples} random inputs); nothing published")
    ops = op_types(candidate, timeout_s=spec.timeout_s)
    if spec.mode == "full-int8" and not any(k.endswith("[int8]") for k in ops):
        raise StepFailed(f"the quantizer produced no int8 layers (op types {ops}); nothing published")
    shutil.copyfile(candidate, ctx.outdir / "model.mnn")
    fp32_size, size = fp32.stat().st_size, candidate.stat().st_size
    return Result(
        mode=spec.mode,
        fp32_size_bytes=fp32_size,
        size_bytes=size,
        size_ratio=round(size / fp32_size, 6),
        op_types=ops,
        float_layers=skip,
        fp32=Evaluation(cosine=1.0),
        quantized=ev,
        metrics={"size_ratio": size / fp32_size, "cosine": ev.cosine, "float_layers": float(len(skip))},
    )


def _multi_input_int8(spec: Spec, ctx, fp32: Path) -> tuple[Path, list[str]]:
    """Full int8 of a model with several inputs: every sample carries every input (MNN's sequence
    layout), from the calibration npz or seeded random inputs within each input's range."""
    from ..calibration import write_multi_input_calibration
    from ..data import load_named_samples
    from ..engines.mnn import quantizer_blockers
    from ..sensitivity import quantizable_layers
    from .convert import random_inputs

    assert spec.inputs is not None
    inputs = list(spec.inputs)
    blockers = quantizer_blockers(fp32, spec.activation_method)
    if blockers:  # before calibration data is written: the quantizer would only segfault
        raise InputError(f"model: {spec.model.uri}: {'; '.join(blockers)}")
    ref = spec.calibration
    if ref is None:  # another seed than the check's: the model is not checked on its calibration data
        samples = random_inputs(inputs, spec.calibration_samples, spec.seed + 1)
    else:
        samples = load_named_samples(ref, ctx.local(ref.uri) if ref.uri else None, inputs)[: spec.calibration_samples]
    calib = write_multi_input_calibration(samples, inputs, ctx.scratch("calibration"))
    known = {n for n, _ in quantizable_layers(str(fp32))}
    unknown = [s for s in spec.skip_layers if s not in known]
    if unknown:
        raise InputError(f"skip_layers: {unknown} are not quantizable layers of this model; it has {sorted(known)}")
    quantizer = _Int8Quantizer(spec, fp32, calib.config, ctx.scratch("int8"), evaluator=None)
    path, _ = quantizer.quantize(list(spec.skip_layers))
    return path, list(spec.skip_layers)


def _qat(spec: Spec, ctx, name: str, shape: tuple[int, ...]) -> tuple[Path, list[str]]:
    """Quantization-aware fine-tune on the labelled calibration set, converted with its int8 scales."""
    from ..calibration import check_matches_input
    from ..data import load_dataset
    from ..modelio import load_torch
    from ..qat import quantize_aware

    assert spec.calibration is not None  # the validator guarantees it
    ref = spec.calibration
    train = load_dataset(ref, ctx.local(ref.uri) if ref.uri else None)
    check_matches_input(train, shape, name, "calibration")
    model = load_torch(spec.model, ctx.local(spec.model.uri))
    return quantize_aware(
        model, train, name, shape, ctx.scratch("qat"), epochs=spec.qat_epochs, lr=spec.qat_lr, seed=spec.seed, timeout_s=spec.timeout_s
    )


def _default_weights(mode: str) -> WeightCompression:
    return WeightCompression(fp16=True) if mode == "fp16" else WeightCompression(bits=8)
