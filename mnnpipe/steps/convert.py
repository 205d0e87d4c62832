"""convert: a torch or ONNX model -> ONNX -> .mnn, verified against the source before publishing.

    torch (TorchScript .pt, torch.export .pt2, state-dict + factory) --torch.onnx.export--> model.onnx
    model.onnx --MNN converter (child process)--> model.mnn
    then: source model and model.mnn (MNN's Python runtime) run the same N sample inputs;
    the fidelity must be within `tolerance`, else StepFailed and nothing is published.

Before conversion model.onnx is normalised where MNN misreads ONNX (engines/onnx_fixups.py; the
rewrites applied are in the result) and an ONNX source's open input dimensions are fixed to the
declared shapes. An fp32 torch export that does not verify is retried with the export settings in
EXPORT_FALLBACKS; the result records the settings kept. ONNX sources that ONNX Runtime refuses
(opset-6-era ops) are verified against the model upgraded by onnx's version converter, or onnx's
reference evaluator. A failed verification names the first op whose output diverges
(divergence.py); `mnnpipe run --keep-failed` keeps the failed model and that table.

Tolerance defaults (`Tolerance()`): max abs error 1e-3, cosine >= 0.999, top-1 agreement >= 0.99.
They fit a plain fp32 conversion (measured: max abs error ~1e-7 to 1e-5). They are NOT loosened
when `weights` asks for fp16 storage or low-bit weights: set `tolerance` yourself for those
(e.g. 8-bit: max_abs_error null, min_cosine 0.999; 4-bit: min_cosine 0.99 — see
benchmarks/results/convert.md for measured values).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from ..catalog import HandOff, register
from ..errors import InputError, SpecError, StepFailed, ToolError
from ..specs import DatasetRef, ModelRef, StepResult, StepSpec, Strict, TensorSpec, Tolerance, check_sample_memory, tensor_bytes
from ..stepkit import NP_DTYPES, random_inputs
from ..verify import Fidelity, check, compare

if TYPE_CHECKING:
    from ..data import Dataset

MNN_FILE = "model.mnn"
ONNX_FILE = "model.onnx"

# torch -> ONNX settings tried, in order, after the spec's own when its fp32 .mnn does not verify.
# Measured on all-MiniLM-L6-v2: opset 17 with a dynamic batch converted to cosine 0.26; opset 17
# static and opset 13 dynamic to 0.999995. nn.MultiheadAttention needs opset >= 14.
EXPORT_FALLBACKS: tuple[tuple[int, bool], ...] = ((17, False), (14, True), (13, True))


class WeightCompression(Strict):
    """How the MNN converter stores weights. Storage only: MNN turns them back to float at load.

    Shared with the quantize step (import it from here; do not re-declare).
    """

    fp16: bool = Field(False, description="Store weights as float16 (MNN converter --fp16): about half the size.")
    bits: int | None = Field(
        None,
        ge=2,
        le=8,
        description="Weight-only quantization to this many bits, 2-8 (MNN converter --weightQuantBits); "
        "None keeps float weights. 8 bits is about a quarter of the fp32 size.",
    )
    asymmetric: bool = Field(
        False, description="Asymmetric (zero-point) weight quantization (--weightQuantAsymmetric); needs `bits`."
    )
    block_size: int = Field(
        0,
        ge=0,
        description="Quantize in blocks of this many input channels (--weightQuantBlock); 0: one scale per output channel. Needs `bits`.",
    )
    hqq: bool = Field(
        False, description="Half-quadratic quantization of the weights (--hqq; implies asymmetric); needs `bits`."
    )
    detect_sparse: bool = Field(
        False,
        description="Store sparse weights compactly (--detectSparseSpeedUp): 90%-sparse ResNet-18 fp32 shrinks to "
        "about 0.2x; without it zeros save nothing. No measured speed-up on x86.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> WeightCompression:
        if self.fp16 and self.bits is not None:
            raise ValueError("fp16 and bits are exclusive: MNN's converter silently drops the weight quantization when both are set")
        if self.bits is None:
            for name in ("asymmetric", "hqq"):
                if getattr(self, name):
                    raise ValueError(f"{name} applies only to weight quantization: set `bits` too")
            if self.block_size:
                raise ValueError("block_size applies only to weight quantization: set `bits` too")
        return self

    @property
    def lossless(self) -> bool:
        return not self.fp16 and self.bits is None  # sparse storage is exact too

    def converter_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for engines.mnn.convert_onnx_to_mnn."""
        return {
            "fp16": self.fp16,
            "weight_quant_bits": self.bits,
            "weight_quant_asymmetric": self.asymmetric,
            "weight_quant_block": self.block_size,
            "hqq": self.hqq,
            "detect_sparse": self.detect_sparse,
        }


class Spec(StepSpec):
    """Convert a torch or ONNX model to MNN and verify the .mnn against the source model."""

    kind: Literal["convert"] = "convert"
    model: ModelRef = Field(description="The source model: TorchScript, torch.export .pt2, state-dict + factory, or ONNX.")
    inputs: list[TensorSpec] | None = Field(
        None,
        min_length=1,
        description="The model's inputs in call order (name, static shape with batch dimension, dtype, sample range). "
        "Required for torch models; for an ONNX model None reads them from the graph (a dynamic batch dimension "
        "becomes 1; other dynamic dimensions must be declared here), and declared shapes fix the graph's dynamic "
        "dimensions for conversion and verification.",
    )
    opset: int = Field(17, ge=11, le=20, description="ONNX opset for the torch -> ONNX export (ignored for ONNX sources).")
    dynamic_batch: bool = Field(
        True, description="Export the batch dimension as symbolic so model.onnx and model.mnn accept any batch size."
    )
    weights: WeightCompression = Field(
        default_factory=WeightCompression, description="Weight storage in the .mnn (fp16 or low-bit); default fp32."
    )
    samples: DatasetRef | None = Field(
        None,
        description="Where verification inputs come from (single-input models); None: random values within each input's `range`, seeded.",
    )
    num_samples: int = Field(8, ge=1, le=4096, description="How many sample inputs the .mnn and the source model are compared on.")
    tolerance: Tolerance = Field(
        default_factory=Tolerance,
        description="How close the .mnn must stay to the source model. Defaults fit fp32; loosen them yourself for fp16/low-bit weights. "
        "Set output_kind for outputs that are not class logits (dense maps, embeddings).",
    )
    timeout_s: float = Field(600, gt=0, le=86400, description="Time limit for the MNN converter (seconds).")

    @field_validator("model")
    @classmethod
    def _model(cls, v: ModelRef) -> ModelRef:
        if v.format == "mnn":
            raise ValueError("convert takes a torch or ONNX model; this one is already .mnn")
        if v.format == "openvino":
            raise ValueError("convert takes a torch or ONNX model, not an OpenVINO IR")
        return v

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, v: list[TensorSpec] | None) -> list[TensorSpec] | None:
        if v is None:
            return v
        names = [t.name for t in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"input names must be unique, repeated: {dupes}")
        return v

    @model_validator(mode="after")
    def _samples_fit(self) -> Spec:
        if self.inputs is None:
            if self.model.format != "onnx":
                raise ValueError("inputs (name, shape, dtype of each input) is required for a torch model")
            return self  # read from the ONNX graph at run time, and checked there
        _check_inputs_fit(self.inputs, self.num_samples, self.samples)
        return self


class Result(StepResult):
    kind: Literal["convert"] = "convert"
    source_format: str = Field(description="Format of the source model.")
    source_bytes: int = Field(description="Size of the source model file on disk.")
    onnx_bytes: int = Field(description="Size of model.onnx on disk.")
    mnn_bytes: int = Field(description="Size of model.mnn on disk.")
    fidelity: Fidelity = Field(description="The .mnn against the source model; the worst over all outputs.")
    fidelity_per_output: dict[str, Fidelity] = Field(description="The .mnn against the source model, per output name.")
    converter_options: dict[str, Any] = Field(description="Options the MNN converter ran with.")
    opset: int | None = Field(description="Opset of model.onnx (the default domain).")
    input_names: list[str] = Field(description="Model input names, in call order.")
    output_names: list[str] = Field(description="Model output names.")
    converter_log: str = Field("", description="The last lines of the MNN converter's log.")
    export: dict[str, Any] | None = Field(
        None, description="The torch -> ONNX export settings of the published model (opset, dynamic_batch); None for an ONNX source."
    )
    verified_shapes: dict[str, list[int]] = Field(
        default_factory=dict, description="The input shapes the .mnn was verified at (declared or read from the model)."
    )
    reference_runtime: str = Field("", description="What ran the source model for verification (torch, onnxruntime, ...).")
    graph_rewrites: list[str] = Field(
        default_factory=list, description="Rewrites applied to model.onnx so MNN reads it as ONNX means it (see engines/onnx_fixups.py)."
    )
    export_attempts: list[str] = Field(
        default_factory=list, description="Export settings tried before the published one, and why each was not kept."
    )


# --------------------------------------------------------------------------- sample inputs


def _check_inputs_fit(inputs: list[TensorSpec], num_samples: int, samples: DatasetRef | None) -> None:
    """ValueError when a dataset is to feed several inputs, or the sample inputs would need more
    than SAMPLE_MAX_BYTES: checked by the spec, or at run time for inputs read from the ONNX graph."""
    if samples is not None and len(inputs) != 1:
        raise ValueError("samples (a dataset) can feed only a single-input model; omit it to use random inputs")
    per_sample = sum(tensor_bytes(t) for t in inputs)
    check_sample_memory(num_samples * per_sample, f"num_samples ({num_samples}) x inputs ({per_sample} bytes per sample)")


def dataset_inputs(ds: Dataset, t: TensorSpec, n: int) -> list[list[np.ndarray]]:
    """Up to `n` samples of a dataset, grouped into batches of the input's batch size."""
    x = ds.x
    if tuple(x.shape[1:]) != tuple(t.shape[1:]):
        raise InputError(
            f"samples: dataset samples have shape {list(x.shape[1:])} but input '{t.name}' expects {list(t.shape[1:])} (after the batch dimension)"
        )
    batch = t.shape[0]
    x = x[: n * batch]
    groups = [x[i : i + batch] for i in range(0, len(x) - batch + 1, batch)]
    if not groups:
        raise InputError(f"samples: the dataset has {len(x)} samples, fewer than one batch of {batch}")
    return [[g.astype(NP_DTYPES[t.dtype])] for g in groups]


# --------------------------------------------------------------------------- the step


def _reference_outputs(runner: Any, samples: list[list[np.ndarray]], spec: Spec, inputs: list[TensorSpec]) -> list[list[np.ndarray]]:
    """Run the source model; a shape that does not fit becomes an InputError naming the inputs."""
    try:
        return [runner.run(s) for s in samples]
    except InputError as exc:
        declared = ", ".join(f"'{t.name}' {list(t.shape)}" for t in inputs)
        raise InputError(f"inputs: declared {declared} do not fit the model {spec.model.uri}: {exc}") from None


def _onnx_opset(path: Path) -> int | None:
    from ..engines.onnx_header import read_opset  # not onnx.load: it would parse every weight again

    return read_opset(path)


_ONNX_DTYPES = {1: "float32", 11: "float64", 7: "int64", 6: "int32", 2: "uint8"}  # onnx.TensorProto codes


def _onnx_inputs(path: Path, spec: Spec) -> list[TensorSpec]:
    """The inputs of an ONNX source: the spec's, checked against the graph, or the graph's own.

    A dimension the graph leaves open (a name, -1, or none) accepts any declared size; that size is
    what model.onnx is fixed to before conversion (engines/onnx_fixups.normalise_for_mnn).
    """
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:
        raise InputError(f"{spec.model.uri}: not a loadable ONNX model ({type(exc).__name__})") from None
    initializers = {i.name for i in graph.initializer}
    real = [i for i in graph.input if i.name not in initializers]
    names = [i.name for i in real]
    graph_dims = {i.name: [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in i.type.tensor_type.shape.dim] for i in real}
    if spec.inputs is None:
        inferred = []
        for i in real:
            dims = graph_dims[i.name]
            shown = [d if d is not None else "?" for d in dims]
            if not dims or any(d is None for d in dims[1:]):
                raise InputError(f"inputs: the ONNX input '{i.name}' has dynamic dimensions {shown}: declare its shape in `inputs`")
            dtype = _ONNX_DTYPES.get(i.type.tensor_type.elem_type)
            if dtype is None:
                raise InputError(f"inputs: the ONNX input '{i.name}' has element type {i.type.tensor_type.elem_type}, expected one of {sorted(_ONNX_DTYPES.values())}")
            inferred.append(TensorSpec(name=i.name, shape=(dims[0] or 1, *dims[1:]), dtype=dtype))
        return inferred
    if [t.name for t in spec.inputs] != names:
        raise InputError(f"inputs: the ONNX model takes inputs {names}, the spec declares {[t.name for t in spec.inputs]}")
    for t in spec.inputs:
        dims = graph_dims[t.name]
        if len(dims) != len(t.shape) or any(d is not None and d != s for d, s in zip(dims, t.shape)):
            shown = [d if d is not None else "?" for d in dims]
            raise InputError(f"inputs: input '{t.name}' is declared {list(t.shape)} but the ONNX model expects {shown}")
    return list(spec.inputs)


def _worst(per_output: dict[str, Fidelity]) -> Fidelity:
    from ..verify import worst

    return worst(list(per_output.values()))


def _per_sample_rows(outputs: list[list[np.ndarray]], k: int) -> list[np.ndarray]:
    """Output `k` of every run, split into one array per batch row (what verify.compare wants)."""
    return [row for run in outputs for row in np.asarray(run[k])]


def _convert_and_compare(
    spec: Spec,
    onnx_path: Path,
    mnn_path: Path,
    names: list[str],
    output_names: list[str],
    samples: list[list[np.ndarray]],
    reference: list[list[np.ndarray]],
) -> tuple[Any, str, dict[str, Fidelity]]:
    """model.onnx -> model.mnn, run on the samples; the .mnn's runner, the converter log, fidelity per output."""
    from ..engines import mnn
    from ..engines.runtimes import MnnRunner

    try:
        log = mnn.convert_onnx_to_mnn(onnx_path, mnn_path, timeout_s=spec.timeout_s, **spec.weights.converter_kwargs())
    except ValueError as exc:  # option combinations the engine refuses
        raise SpecError(f"weights: {exc}") from None
    try:
        # Names fixed to the ONNX graph's, so outputs come back in the same order as the source's.
        candidate = MnnRunner(mnn_path, threads=1, precision="normal", input_names=names, output_names=output_names)
    except InputError as exc:  # the converter wrote a file MNN cannot load: the tool failed
        raise ToolError(f"the MNN converter wrote a model that does not load: {exc}") from None
    try:
        produced = [candidate.run(s) for s in samples]
    except InputError as exc:
        raise ToolError(f"the converted .mnn fails on the verification inputs: {exc}") from None
    if len(produced[0]) != len(reference[0]):
        raise ToolError(f"the .mnn returns {len(produced[0])} outputs, the source model {len(reference[0])}")
    per_output = {
        name: compare(_per_sample_rows(reference, k), _per_sample_rows(produced, k), spec.tolerance.output_kind)
        for k, name in enumerate(output_names)
    }
    return candidate, log, per_output


def _explain_failure(message: str, onnx_path: Path, mnn_path: Path, names: list[str], sample: list[np.ndarray], scratch: Path) -> str:
    """The verification failure, with the first op whose output diverges and, with --keep-failed,
    where the failed model and the divergence table were kept."""
    from ..divergence import find_divergence
    from ..failures import keep_failed

    files = {ONNX_FILE: onnx_path, "model.mnn.FAILED": mnn_path}
    try:
        divergence = find_divergence(onnx_path, mnn_path, names, sample, scratch)
    except Exception as exc:  # the diagnosis must never hide the verdict
        message += f"; the divergence report could not be made ({type(exc).__name__})"
    else:
        message += f"; {divergence.summary()}"
        (scratch / "divergence.md").write_text(divergence.to_markdown())
        files["divergence.md"] = scratch / "divergence.md"
    kept = keep_failed("convert", files, message)
    return message + (f"; kept for inspection in {kept}" if kept else "")


def _retry_folded(spec: Spec, onnx_path: Path, names: list[str], output_names: list[str], samples, reference, inputs, scratch: Path):
    """The last resort after verification failed: the same graph with its shape arithmetic folded
    at the declared shapes (engines/onnx_fixups.fold_at_static_shapes). (candidate, log,
    per-output fidelity, worst fidelity) when that verifies, else None."""
    from ..engines.onnx_fixups import fold_at_static_shapes

    folded_onnx, folded_mnn = scratch / "folded.onnx", scratch / "folded.mnn"
    if not fold_at_static_shapes(onnx_path, folded_onnx, {t.name: t.shape for t in inputs}):
        return None
    try:
        candidate, log, per_output = _convert_and_compare(spec, folded_onnx, folded_mnn, names, output_names, samples, reference)
        fidelity = _worst(per_output)
        check(fidelity, spec.tolerance, "the .mnn of the constant-folded graph against the source model")
    except (StepFailed, ToolError):
        return None
    return candidate, log, per_output, fidelity


def _describe_export(setting: tuple[int, bool]) -> str:
    return f"opset {setting[0]}, {'dynamic' if setting[1] else 'static'} batch"


def run(spec: Spec, ctx: Any) -> Result:
    from ..engines.confined_torch import ConfinedTorchModel
    from ..engines.onnx_fixups import normalise_for_mnn, open_reference

    src_path = ctx.local(spec.model.uri)
    if src_path.is_dir():
        raise InputError(f"{spec.model.uri}: is a folder, expected a model file")
    if spec.model.format == "onnx":
        inputs = _onnx_inputs(src_path, spec)
        if spec.inputs is None:  # the spec validator could not size what it did not know
            try:
                _check_inputs_fit(inputs, spec.num_samples, spec.samples)
            except ValueError as exc:
                raise SpecError(str(exc)) from None
    else:
        assert spec.inputs is not None  # the validator requires them for torch models
        inputs = list(spec.inputs)
    names = [t.name for t in inputs]
    if spec.samples is not None:
        samples = dataset_inputs(ctx.dataset(spec.samples, "samples"), inputs[0], spec.num_samples)
    else:
        samples = random_inputs(inputs, spec.num_samples, spec.seed)

    scratch = ctx.scratch("convert")
    onnx_path, mnn_path = scratch / ONNX_FILE, scratch / MNN_FILE
    if spec.model.format == "onnx":
        source, reference_runtime = open_reference(spec.model.uri, src_path, scratch)
        reference = _reference_outputs(source, samples, spec, inputs)
        output_names = list(source.output_names)
        settings: list[tuple[int, bool] | None] = [None]
    else:
        # The model is code: it is loaded, run and exported only in a confined child process.
        source = ConfinedTorchModel(spec.model, src_path, scratch, input_names=names, timeout_s=spec.timeout_s)
        reference_runtime = "torch"
        reference = _reference_outputs(source, samples, spec, inputs)
        example = samples[0]
        settings = [(spec.opset, spec.dynamic_batch)]
        if spec.weights.lossless:  # a lossy .mnn that misses the tolerance is not the exporter's fault
            settings += [s for s in EXPORT_FALLBACKS if s != settings[0]]

    attempts: list[str] = []
    exported: tuple[int, bool] | None = None
    try:
        for setting in settings:
            if setting is not None:
                opset, dynamic = setting
                try:
                    output_names = source.export_onnx(example, onnx_path, input_names=names, opset=opset, dynamic_batch=dynamic)
                    exported = setting  # what onnx_path now holds (a failed export leaves the last one)
                except ToolError as exc:
                    if not attempts:
                        raise  # the model the user asked for does not export: say why, not what a fallback did
                    attempts.append(f"{_describe_export(setting)}: {exc}")
                    continue
            # an ONNX source is read from where it is once, and written here normalised
            rewrites = normalise_for_mnn(src_path if setting is None else onnx_path, onnx_path, {t.name: t.shape for t in inputs})
            try:
                candidate, log, per_output = _convert_and_compare(spec, onnx_path, mnn_path, names, output_names, samples, reference)
                fidelity = _worst(per_output)
                check(fidelity, spec.tolerance, f"the .mnn ({_describe_weights(spec.weights)}) against the source model")
                break
            except StepFailed as exc:  # outside the tolerance, or output shapes differ
                failure = str(exc)
                if setting is not None:
                    attempts.append(f"{_describe_export(setting)}: {failure}")
        else:
            rescued = _retry_folded(spec, onnx_path, names, output_names, samples, reference, inputs, scratch) if spec.weights.lossless else None
            if rescued is None:
                tried = f" (export settings tried: {' | '.join(attempts)})" if len(attempts) > 1 else ""
                raise StepFailed(_explain_failure(failure + tried, onnx_path, mnn_path, names, samples[0], scratch))
            candidate, log, per_output, fidelity = rescued
            shutil.copyfile(scratch / "folded.onnx", onnx_path)
            shutil.copyfile(scratch / "folded.mnn", mnn_path)
            rewrites = [*rewrites, "static-shape-constant-fold"]
            log += f"\nverification failed on the graph as given ({failure}); passed after constant-folding it at the declared shapes"
    finally:  # the confined torch child holds the model: never leave it behind
        if isinstance(source, ConfinedTorchModel):
            source.close()
    # Verified: only now does anything go where it will be published.
    shutil.copyfile(onnx_path, ctx.outdir / ONNX_FILE)
    shutil.copyfile(mnn_path, ctx.outdir / MNN_FILE)
    source_bytes = src_path.stat().st_size
    onnx_bytes = (ctx.outdir / ONNX_FILE).stat().st_size
    mnn_bytes = (ctx.outdir / MNN_FILE).stat().st_size
    metrics = {
        "source_bytes": float(source_bytes),
        "onnx_bytes": float(onnx_bytes),
        "mnn_bytes": float(mnn_bytes),
        "mnn_to_source_size_ratio": mnn_bytes / source_bytes if source_bytes else 0.0,
        "max_abs_error": fidelity.max_abs_error,
        "mean_rel_error": fidelity.mean_rel_error,
        "cosine": fidelity.cosine,
    }
    for name in ("top1_agreement", "top5_agreement", "neighbour_agreement", "pixel_agreement", "mean_iou"):
        if getattr(fidelity, name) is not None:
            metrics[name] = getattr(fidelity, name)
    return Result(
        source_format=spec.model.format,
        source_bytes=source_bytes,
        onnx_bytes=onnx_bytes,
        mnn_bytes=mnn_bytes,
        fidelity=fidelity,
        fidelity_per_output=per_output,
        converter_options=spec.weights.converter_kwargs(),
        opset=_onnx_opset(onnx_path),
        input_names=names,
        output_names=list(candidate.output_names) or output_names,
        converter_log=log,
        export=None if exported is None else {"opset": exported[0], "dynamic_batch": exported[1]},
        export_attempts=attempts,
        reference_runtime=reference_runtime,
        verified_shapes={t.name: list(t.shape) for t in inputs},
        graph_rewrites=rewrites,
        metrics=metrics,
    )


def _describe_weights(w: WeightCompression) -> str:
    if w.fp16:
        return "fp16 weights"
    if w.bits is not None:
        return f"{w.bits}-bit weights"
    return "fp32"


register(name="convert", spec=Spec, result=Result, run=run, stage="convert", model_input="model", hands_on=HandOff("model.mnn", "mnn"), optional=False)
