"""convert: a torch or ONNX model -> ONNX -> .mnn, verified against the source before publishing.

    torch (TorchScript .pt, torch.export .pt2, state-dict + factory) --torch.onnx.export--> model.onnx
    model.onnx --MNN converter (child process)--> model.mnn
    then: source model and model.mnn (MNN's Python runtime) run the same N sample inputs;
    the fidelity must be within `tolerance`, else StepFailed and nothing is published.

Tolerance defaults (`Tolerance()`): max abs error 1e-3, cosine >= 0.999, top-1 agreement >= 0.99.
They fit a plain fp32 conversion (measured: max abs error ~1e-7 to 1e-5). They are NOT loosened
when `weights` asks for fp16 storage or low-bit weights: set `tolerance` yourself for those
(e.g. 8-bit: max_abs_error null, min_cosine 0.999; 4-bit: min_cosine 0.99 — see
benchmarks/results/convert.md for measured values).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from ..errors import InputError, SpecError, ToolError
from ..specs import DatasetRef, ModelRef, StepResult, StepSpec, Strict, TensorSpec, Tolerance
from ..verify import Fidelity, check, compare

MNN_FILE = "model.mnn"
ONNX_FILE = "model.onnx"


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
    inputs: list[TensorSpec] = Field(
        min_length=1,
        description="The model's inputs in call order (name, static shape with batch dimension, dtype, sample range).",
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
        description="How close the .mnn must stay to the source model. Defaults fit fp32; loosen them yourself for fp16/low-bit weights.",
    )
    timeout_s: float = Field(600, gt=0, le=86400, description="Time limit for the MNN converter (seconds).")

    @field_validator("model")
    @classmethod
    def _model(cls, v: ModelRef) -> ModelRef:
        if v.format == "mnn":
            raise ValueError("convert takes a torch or ONNX model; this one is already .mnn")
        return v

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, v: list[TensorSpec]) -> list[TensorSpec]:
        names = [t.name for t in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"input names must be unique, repeated: {dupes}")
        return v

    @model_validator(mode="after")
    def _samples_fit(self) -> Spec:
        if self.samples is not None and len(self.inputs) != 1:
            raise ValueError("samples (a dataset) can feed only a single-input model; omit it to use random inputs")
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


# --------------------------------------------------------------------------- sample inputs


_NP_DTYPES = {"float32": np.float32, "int64": np.int64, "int32": np.int32, "uint8": np.uint8}


def random_inputs(inputs: list[TensorSpec], n: int, seed: int) -> list[list[np.ndarray]]:
    """`n` samples; each a list of arrays (one per input) drawn uniformly from the input's range."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        sample = []
        for t in inputs:
            lo, hi = t.range
            if t.dtype == "float32":
                sample.append(rng.uniform(lo, hi, size=t.shape).astype(np.float32))
            else:
                sample.append(rng.integers(int(np.ceil(lo)), max(int(np.ceil(lo)) + 1, int(np.ceil(hi))), size=t.shape).astype(_NP_DTYPES[t.dtype]))
        out.append(sample)
    return out


def dataset_inputs(ref: DatasetRef, local: Path | None, t: TensorSpec, n: int) -> list[list[np.ndarray]]:
    """Up to `n` samples from a dataset, grouped into batches of the input's batch size."""
    from ..data import load_dataset

    ds = load_dataset(ref, local)
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
    return [[g.astype(_NP_DTYPES[t.dtype])] for g in groups]


# --------------------------------------------------------------------------- the step


def _reference_outputs(runner: Any, samples: list[list[np.ndarray]], spec: Spec) -> list[list[np.ndarray]]:
    """Run the source model; a shape that does not fit becomes an InputError naming the inputs."""
    try:
        return [runner.run(s) for s in samples]
    except InputError as exc:
        declared = ", ".join(f"'{t.name}' {list(t.shape)}" for t in spec.inputs)
        raise InputError(f"inputs: declared {declared} do not fit the model {spec.model.uri}: {exc}") from None


def _onnx_opset(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _check_onnx_inputs(path: Path, spec: Spec) -> None:
    """Declared input names and static dims must match an ONNX source's graph inputs."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:
        raise InputError(f"{spec.model.uri}: not a loadable ONNX model ({type(exc).__name__})") from None
    initializers = {i.name for i in graph.initializer}
    real = [i for i in graph.input if i.name not in initializers]
    names = [i.name for i in real]
    if [t.name for t in spec.inputs] != names:
        raise InputError(f"inputs: the ONNX model takes inputs {names}, the spec declares {[t.name for t in spec.inputs]}")
    for t, i in zip(spec.inputs, real):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
        if len(dims) != len(t.shape) or any(d is not None and d != s for d, s in zip(dims, t.shape)):
            shown = [d if d is not None else "?" for d in dims]
            raise InputError(f"inputs: input '{t.name}' is declared {list(t.shape)} but the ONNX model expects {shown}")


def _worst(per_output: dict[str, Fidelity]) -> Fidelity:
    fids = list(per_output.values())
    top1 = [f.top1_agreement for f in fids if f.top1_agreement is not None]
    return Fidelity(
        samples=fids[0].samples,
        max_abs_error=max(f.max_abs_error for f in fids),
        mean_rel_error=max(f.mean_rel_error for f in fids),
        cosine=min(f.cosine for f in fids),
        top1_agreement=min(top1) if top1 else None,
    )


def _per_sample_rows(outputs: list[list[np.ndarray]], k: int) -> list[np.ndarray]:
    """Output `k` of every run, split into one array per batch row (what verify.compare wants)."""
    return [row for run in outputs for row in np.asarray(run[k])]


def run(spec: Spec, ctx: Any) -> Result:
    from ..engines import mnn
    from ..engines.onnx_export import export_onnx
    from ..engines.runtimes import MnnRunner, open_model

    src_path = ctx.local(spec.model.uri)
    if src_path.is_dir():
        raise InputError(f"{spec.model.uri}: is a folder, expected a model file")
    names = [t.name for t in spec.inputs]
    if spec.samples is not None:
        local = ctx.local(spec.samples.uri) if spec.samples.uri else None
        samples = dataset_inputs(spec.samples, local, spec.inputs[0], spec.num_samples)
    else:
        samples = random_inputs(spec.inputs, spec.num_samples, spec.seed)

    scratch = ctx.scratch("convert")
    onnx_path, mnn_path = scratch / ONNX_FILE, scratch / MNN_FILE
    if spec.model.format == "onnx":
        _check_onnx_inputs(src_path, spec)
        source = open_model(spec.model, src_path, threads=1)
        reference = _reference_outputs(source, samples, spec)
        shutil.copyfile(src_path, onnx_path)
        output_names = list(source.output_names)
    else:
        import torch

        source = open_model(spec.model, src_path, threads=1, input_names=names)
        reference = _reference_outputs(source, samples, spec)
        example = tuple(torch.from_numpy(a) for a in samples[0])
        output_names = export_onnx(
            source.model, example, onnx_path, input_names=names, opset=spec.opset, dynamic_batch=spec.dynamic_batch
        )

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
        name: compare(_per_sample_rows(reference, k), _per_sample_rows(produced, k)) for k, name in enumerate(output_names)
    }
    fidelity = _worst(per_output)
    check(fidelity, spec.tolerance, f"the .mnn ({_describe_weights(spec.weights)}) against the source model")

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
    if fidelity.top1_agreement is not None:
        metrics["top1_agreement"] = fidelity.top1_agreement
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
        metrics=metrics,
    )


def _describe_weights(w: WeightCompression) -> str:
    if w.fp16:
        return "fp16 weights"
    if w.bits is not None:
        return f"{w.bits}-bit weights"
    return "fp32"
