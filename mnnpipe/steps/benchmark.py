"""benchmark: size, latency, peak memory and accuracy (or fidelity) of one or more models.

Each model is measured in its own confined child process (engines.runtimes.MeasureServer): .mnn in
MNN's runtime, .onnx in ONNX Runtime, TorchScript/.pt2/state-dict in torch eager, one thread
setting at a time. Latency is wall-clock per call after warm-up (mean, p50, p90, p99 in ms).

Peak memory: the child's peak resident set size (VmHWM) while loading the model and running
every timed setting, minus its resident set size after importing the runtime and reading the
inputs (the baseline; the kernel's peak is reset there). tracemalloc would miss everything torch, ONNX Runtime and MNN allocate natively.

Published: metrics.json (`{"metrics": {"<label>/<metric>": number}, "rows": [...], "models": [...]}`:
the flat `metrics` map is what a KFP Metrics artifact logs), report.md, report.html (plot of
median latency vs size, accuracy written next to each point, embedded as a base64 PNG).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..catalog import register
from ..errors import InputError
from ..specs import DatasetRef, ModelRef, StepResult, StepSpec, Strict, TensorSpec, check_sample_memory, tensor_bytes
from ..stepkit import random_tensor
from ..verify import Fidelity, compare

METRICS_FILE = "metrics.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
MEMORY_METHOD = (
    "peak RSS (VmHWM) of a child process per model while loading and timing it, minus that process's RSS after "
    "importing the runtime and reading the inputs (peak reset there via /proc/self/clear_refs)"
)
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


class ModelUnderTest(Strict):
    """One model to measure, and the name it is reported under."""

    label: str = Field(description="Short name used in tables and metric keys (letters, digits, _ . -).")
    model: ModelRef = Field(description="The model: .mnn, ONNX, TorchScript, .pt2, or state-dict + factory.")

    @field_validator("label")
    @classmethod
    def _label(cls, v: str) -> str:
        if not _LABEL_RE.match(v):
            raise ValueError(f"label must be 1-64 letters, digits, '_', '.', '-' (starting with a letter or digit), got '{v}'")
        return v


class Spec(StepSpec):
    """Measure size, latency, peak memory and accuracy or fidelity of models, side by side."""

    kind: Literal["benchmark"] = "benchmark"
    models: list[ModelUnderTest] = Field(min_length=1, description="The models to measure, each with a unique label.")
    dataset: DatasetRef | None = Field(
        None,
        description="Labelled evaluation set: top-1/top-5 accuracy per model, and the inputs timing uses. "
        "None: random inputs from `inputs`.",
    )
    inputs: list[TensorSpec] = Field(
        default_factory=list,
        description="The models' inputs (name, shape with batch dimension, dtype, range). The batch dimension is "
        "replaced by each of `batch_sizes`. May be omitted with a dataset (one input named 'input').",
    )
    threads: list[int] = Field([1], min_length=1, description="Thread counts to time each model with, e.g. [1, 2].")
    batch_sizes: list[int] = Field([1], min_length=1, description="Batch sizes to time each model with, e.g. [1, 8].")
    precision: Literal["normal", "low"] = Field(
        "normal", description="MNN runtime precision: normal (fp32) or low (fp16/bf16 arithmetic where the CPU has it)."
    )
    warmup: int = Field(5, ge=0, le=10000, description="Untimed runs before timing, per setting.")
    iterations: int = Field(30, ge=1, le=100000, description="Timed runs per setting.")
    reference: str | None = Field(
        None, description="Label of the model the others are compared with (fidelity: max abs error, cosine, top-1 agreement)."
    )
    num_samples: int = Field(
        32, ge=1, le=100000, description="Random inputs for the fidelity comparison when there is no dataset."
    )
    timeout_s: float = Field(1800, gt=0, le=86400, description="Time limit for measuring one model (seconds).")
    peers: list[Literal["onnxruntime-int8-u8s8", "openvino-fp32", "openvino-int8"]] = Field(
        default_factory=list,
        description="Peer runtimes to build from an fp32 ONNX model among `models` and time beside it (engines/peers.py): "
        "ONNX Runtime int8 with unsigned activations (the fast x86 setting), OpenVINO fp32 and int8 (NNCF; needs the "
        "`peers` extra). Each is reported under its own name with its setting.",
    )
    peer_source: str | None = Field(
        None, description="Label of the fp32 ONNX model the peers are built from; None: the first ONNX model in `models`."
    )
    peer_calibration: DatasetRef | None = Field(
        None,
        description="Samples the int8 peers are calibrated on (use the split MNN's quantizer was calibrated on). None: the "
        "first `peer_calibration_samples` of `dataset` (the evaluation set, stated in the report), or random inputs.",
    )
    peer_calibration_samples: int = Field(32, ge=1, le=10000, description="At most this many calibration samples for int8 peers.")

    @field_validator("threads")
    @classmethod
    def _threads(cls, v: list[int]) -> list[int]:
        if any(t < 1 or t > 256 for t in v) or len(set(v)) != len(v):
            raise ValueError(f"threads must be distinct integers in [1, 256], got {v}")
        return v

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, v: list[int]) -> list[int]:
        if any(b < 1 or b > 4096 for b in v) or len(set(v)) != len(v):
            raise ValueError(f"batch_sizes must be distinct integers in [1, 4096], got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Spec:
        labels = [m.label for m in self.models]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"models: labels must be unique, repeated: {dupes}")
        if self.reference is not None and self.reference not in labels:
            raise ValueError(f"reference '{self.reference}' is not one of the model labels {labels}")
        if self.peers:
            clash = sorted(set(self.peers) & set(labels))
            if clash or len(set(self.peers)) != len(self.peers):
                raise ValueError(f"peers: each peer once, and no model may be labelled like a peer: {clash or self.peers}")
            onnx_labels = [m.label for m in self.models if m.model.format == "onnx"]
            if self.peer_source is None and not onnx_labels:
                raise ValueError("peers: need an fp32 ONNX model among `models` to build the peers from (e.g. convert's model.onnx)")
            if self.peer_source is not None and self.peer_source not in onnx_labels:
                raise ValueError(f"peer_source '{self.peer_source}' is not the label of an ONNX model; ONNX models: {onnx_labels}")
        if not self.inputs and self.dataset is None:
            raise ValueError("inputs: required when there is no dataset (the shapes random inputs are drawn with)")
        if self.dataset is not None and len(self.inputs) > 1:
            raise ValueError("inputs: a dataset feeds single-input models only; declare one input or none")
        if self.dataset is None:  # random inputs: timing batches, plus num_samples for the fidelity comparison
            per_sample = sum(tensor_bytes(t, batch=1) for t in self.inputs)
            count = sum(self.batch_sizes) + (self.num_samples if self.reference is not None else 0)
            what = f"batch_sizes (sum {sum(self.batch_sizes)})" + (f" + num_samples ({self.num_samples})" if self.reference is not None else "")
            check_sample_memory(count * per_sample, f"{what} x inputs ({per_sample} bytes per sample)")
        return self


class LatencyRow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str
    format: str
    threads: int
    batch: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    iterations: int


class ModelSummary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str
    format: str
    size_bytes: int = Field(description="Bytes on disk.")
    peak_rss_bytes: int = Field(description="Peak resident set size of the measuring process.")
    peak_rss_delta_bytes: int = Field(description="Peak RSS over the process's baseline after importing the runtime.")
    top1: float | None = Field(None, description="Top-1 accuracy on the dataset.")
    top5: float | None = Field(None, description="Top-5 accuracy on the dataset.")
    fidelity: Fidelity | None = Field(None, description="Agreement with the reference model.")
    setting: str | None = Field(None, description="For a peer runtime: how it was built and run.")


class NativeRow(BaseModel):
    """A .mnn timed by an MNN runtime built from source (MNNPIPE_MNN_BENCHMARK: its benchmark.out)."""

    model_config = ConfigDict(extra="forbid")

    label: str
    threads: int
    min_ms: float
    avg_ms: float
    max_ms: float
    iterations: int
    tool: str


class Result(StepResult):
    kind: Literal["benchmark"] = "benchmark"
    rows: list[LatencyRow] = Field(description="Latency per model, thread count and batch size.")
    models: list[ModelSummary] = Field(description="Size, memory, accuracy and fidelity per model.")
    eval_samples: int = Field(0, description="Samples accuracy/fidelity were computed on (0: none).")
    memory_method: str = Field(MEMORY_METHOD, description="How peak memory was measured.")
    machine: dict[str, Any] = Field(default_factory=dict, description="CPU model and cores the numbers were measured on.")
    mnn_source_built: list[NativeRow] = Field(
        default_factory=list,
        description="Each .mnn also timed by the MNN runtime built from source that MNNPIPE_MNN_BENCHMARK names "
        "(scripts/build-mnn.sh; batch 1, the model's stored input shape, random inputs); empty when unset.",
    )


# --------------------------------------------------------------------------- inputs


def _with_batch(shape: tuple[int, ...], batch: int) -> tuple[int, ...]:
    return (batch, *shape[1:])


def _timing_inputs(spec: Spec, inputs: list[TensorSpec], eval_x: np.ndarray | None) -> dict[int, list[np.ndarray]]:
    """Per batch size, one array per input: dataset samples when there are any, else random."""
    rng = np.random.default_rng(spec.seed)
    out = {}
    for b in spec.batch_sizes:
        if eval_x is not None:
            idx = np.arange(b) % len(eval_x)
            out[b] = [eval_x[idx]]
        else:
            out[b] = [random_tensor(t, rng, _with_batch(t.shape, b)) for t in inputs]
    return out


# --------------------------------------------------------------------------- the step


def _build_peers(spec: Spec, ctx: Any, inputs: list[TensorSpec], eval_x: np.ndarray | None) -> list[tuple[str, ModelRef, str]]:
    """(label, model, setting) of each peer in `spec.peers`, built in scratch from the fp32 ONNX model."""
    if not spec.peers:
        return []
    from ..engines.peers import PEERS, build_peer

    source = next(m for m in spec.models if (m.label == spec.peer_source if spec.peer_source else m.model.format == "onnx"))
    n = spec.peer_calibration_samples
    if spec.peer_calibration is not None:
        ref = spec.peer_calibration
        x, origin = ctx.dataset(ref, "peer_calibration").x[:n], f"{ref.format} {ref.split} split"
    elif eval_x is not None:
        x, origin = eval_x[:n], "the benchmark's evaluation set (accuracy of int8 peers is then optimistic)"
    else:
        rng = np.random.default_rng(spec.seed + 2)
        x, origin = random_tensor(inputs[0], rng, _with_batch(inputs[0].shape, n)), "random inputs"
    samples = [np.ascontiguousarray(s[None]) for s in x]
    onnx_path = ctx.local(source.model.uri)
    out = []
    for name in spec.peers:
        path = build_peer(name, onnx_path, samples, inputs[0].name, ctx.scratch("peers"))
        setting = f"{PEERS[name]}; built from '{source.label}'"
        if "int8" in name:
            setting += f"; calibrated on {len(samples)} samples of {origin}"
        out.append((name, ModelRef(uri=str(path), format="onnx" if path.suffix == ".onnx" else "openvino"), setting))
    return out


def _time_source_built(spec: Spec, ctx: Any, targets: list[tuple[str, ModelRef, str | None]]) -> list[NativeRow]:
    """Every .mnn again, through the source-built MNN runtime, when MNNPIPE_MNN_BENCHMARK names one."""
    from ..engines.mnn_native import native_tool, time_native

    tool = native_tool()
    if tool is None:
        return []
    rows = []
    for label, model_ref, _ in targets:
        if model_ref.format != "mnn":
            continue
        path = ctx.local(model_ref.uri)
        for threads in spec.threads:
            t = time_native(tool, path, threads=threads, warmup=spec.warmup, iterations=spec.iterations, precision=spec.precision, timeout_s=spec.timeout_s)
            rows.append(NativeRow(label=label, threads=threads, min_ms=t.min_ms, avg_ms=t.avg_ms, max_ms=t.max_ms, iterations=spec.iterations, tool=str(tool)))
    return rows


def run(spec: Spec, ctx: Any) -> Result:
    from ..engines.peers import size_bytes
    from ..engines.measure import MeasureServer, setting_key
    from ..report import machine_info
    from ..train import topk_accuracy

    labels_y = None
    eval_x: np.ndarray | None = None
    inputs = list(spec.inputs)
    if spec.dataset is not None:
        ds = ctx.dataset(spec.dataset, "dataset")
        eval_x, labels_y = ds.x, ds.y
        if inputs and tuple(inputs[0].shape[1:]) != tuple(eval_x.shape[1:]):
            raise InputError(
                f"inputs: input '{inputs[0].name}' is declared {list(inputs[0].shape)} but dataset samples have shape {list(eval_x.shape[1:])}"
            )
        if not inputs:
            inputs = [TensorSpec(name="input", shape=(1, *eval_x.shape[1:]))]
    eval_inputs: list[np.ndarray] | None = None
    if eval_x is not None:
        eval_inputs = [eval_x]
    elif spec.reference is not None:
        rng = np.random.default_rng(spec.seed + 1)
        eval_inputs = [random_tensor(t, rng, _with_batch(t.shape, spec.num_samples)) for t in inputs]
    timing = _timing_inputs(spec, inputs, eval_x)
    settings = [(t, b) for t in spec.threads for b in spec.batch_sizes]
    targets = [(mut.label, mut.model, None) for mut in spec.models] + _build_peers(spec, ctx, inputs, eval_x)

    rows: list[LatencyRow] = []
    summaries: list[ModelSummary] = []
    outputs: dict[str, list[np.ndarray]] = {}
    # one server imports each runtime once; every model still runs in a confined process of its own
    server = MeasureServer(
        settings=settings,
        timing_inputs=timing,
        eval_inputs=eval_inputs,
        precision=spec.precision,
        warmup=spec.warmup,
        iterations=spec.iterations,
        input_names=[t.name for t in inputs],
        timeout_s=spec.timeout_s,
    )
    try:
        for label, model_ref, setting in ctx.progress(targets, desc="benchmark", total=len(targets)):
            path = Path(model_ref.uri) if setting is not None else ctx.local(model_ref.uri)  # a peer: built in scratch
            if path.is_dir():
                raise InputError(f"{model_ref.uri}: is a folder, expected a model file")
            try:
                m = server.measure(model_ref, path)
            except InputError as exc:
                raise InputError(f"models[{label}]: {exc}") from None
            for t, b in settings:
                lat = m.latency[setting_key(t, b)]
                rows.append(LatencyRow(label=label, format=model_ref.format, threads=t, batch=b, **lat.__dict__))
            summary = ModelSummary(
                label=label,
                format=model_ref.format,
                size_bytes=size_bytes(path),
                peak_rss_bytes=m.peak_rss_bytes,
                peak_rss_delta_bytes=m.peak_rss_delta_bytes,
                setting=setting,
            )
            if m.eval_outputs is not None:
                outputs[label] = m.eval_outputs
                if labels_y is not None:
                    logits = np.stack([np.asarray(o).reshape(-1) for o in m.eval_outputs])
                    summary = summary.model_copy(
                        update={"top1": topk_accuracy(logits, labels_y, 1), "top5": topk_accuracy(logits, labels_y, 5)}
                    )
            summaries.append(summary)
    finally:  # the server's child holds every runtime: never leave it behind
        server.close()
    if spec.reference is not None:
        ref_out = outputs[spec.reference]
        summaries = [
            s if s.label == spec.reference else s.model_copy(update={"fidelity": compare(ref_out, outputs[s.label])})
            for s in summaries
        ]

    native = _time_source_built(spec, ctx, targets)
    result = Result(
        rows=rows,
        models=summaries,
        mnn_source_built=native,
        eval_samples=0 if eval_inputs is None else len(eval_inputs[0]),
        machine=machine_info(),
        metrics=flat_metrics(rows, summaries),
    )
    write_reports(result, spec, ctx.outdir)
    return result


def flat_metrics(rows: list[LatencyRow], summaries: list[ModelSummary]) -> dict[str, float]:
    """`{"<label>/<metric>": number}`: what a KFP Metrics artifact logs, one entry per number."""
    out: dict[str, float] = {}
    for s in summaries:
        out[f"{s.label}/size_bytes"] = float(s.size_bytes)
        out[f"{s.label}/peak_rss_delta_mb"] = round(s.peak_rss_delta_bytes / 2**20, 3)
        for name in ("top1", "top5"):
            if getattr(s, name) is not None:
                out[f"{s.label}/{name}"] = float(getattr(s, name))
        if s.fidelity is not None:
            out[f"{s.label}/max_abs_error"] = s.fidelity.max_abs_error
            out[f"{s.label}/cosine"] = s.fidelity.cosine
            if s.fidelity.top1_agreement is not None:
                out[f"{s.label}/top1_agreement"] = s.fidelity.top1_agreement
    for r in rows:
        for stat in ("mean_ms", "p50_ms", "p90_ms", "p99_ms"):
            out[f"{r.label}/t{r.threads}_b{r.batch}/{stat}"] = round(getattr(r, stat), 4)
    return out


def _table_rows(result: Result) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    by_label = {s.label: s for s in result.models}
    base = result.rows[0].label if result.rows else None
    lat = []
    for r in result.rows:
        # ratio to the first model at the same setting: "how much faster than the baseline"
        first = next((x for x in result.rows if x.label == base and x.threads == r.threads and x.batch == r.batch), None)
        lat.append(
            {
                "model": r.label,
                "format": r.format,
                "threads": r.threads,
                "batch": r.batch,
                "p50 ms": r.p50_ms,
                "mean ms": r.mean_ms,
                "p90 ms": r.p90_ms,
                "p99 ms": r.p99_ms,
                f"p50 / {base}": r.p50_ms / first.p50_ms if first and first.p50_ms else None,
            }
        )
    base_size = by_label[base].size_bytes if base else 0
    models = []
    for s in result.models:
        models.append(
            {
                "model": s.label,
                "format": s.format,
                "size MB": s.size_bytes / 1e6,
                f"size / {base}": s.size_bytes / base_size if base_size else None,
                "peak RSS Δ MB": s.peak_rss_delta_bytes / 2**20,
                "top-1": s.top1,
                "top-5": s.top5,
                "cosine vs ref": s.fidelity.cosine if s.fidelity else None,
                "max abs err vs ref": s.fidelity.max_abs_error if s.fidelity else None,
                "top-1 agree vs ref": s.fidelity.top1_agreement if s.fidelity else None,
            }
        )
    return models, lat


def write_reports(result: Result, spec: Spec, outdir: Any) -> None:
    """metrics.json, report.md and report.html into `outdir`."""
    from ..report import html_report, latency_size_plot, markdown_table

    models, lat = _table_rows(result)
    machine = f"{result.machine.get('cpu')}, {result.machine.get('cores')} cores"
    notes = [
        f"Machine: {machine}. Latency: {spec.warmup} warm-up + {spec.iterations} timed runs per setting; MNN precision {spec.precision}.",
        f"Peak memory: {MEMORY_METHOD}.",
        f"Accuracy/fidelity over {result.eval_samples} samples." if result.eval_samples else "No accuracy: no dataset given.",
        *[f"Peer {s.label}: {s.setting}." for s in result.models if s.setting],
    ]
    md = ["# Benchmark", "", *[n + "  " for n in notes], "", "## Models", "", markdown_table(models), "## Latency", "", markdown_table(lat)]
    if result.mnn_source_built:
        native = [{"model": r.label, "threads": r.threads, "min ms": r.min_ms, "avg ms": r.avg_ms, "max ms": r.max_ms} for r in result.mnn_source_built]
        md += ["## MNN built from source", "", f"`{result.mnn_source_built[0].tool}` (MNN's benchmark.out; batch 1, random inputs).", "", markdown_table(native)]
    (outdir / REPORT_MD).write_text("\n".join(md))
    by_label = {s.label: s for s in result.models}
    batch = min(spec.batch_sizes)
    points = []
    for r in result.rows:
        if r.batch != batch:
            continue
        s = by_label[r.label]
        note = f"top-1 {s.top1:.3f}" if s.top1 is not None else (f"cos {s.fidelity.cosine:.5f}" if s.fidelity else "")
        points.append({"label": r.label, "size_mb": s.size_bytes / 1e6, "latency_ms": r.p50_ms, "series": f"{r.threads} thread(s)", "note": note})
    png = latency_size_plot(points, title=f"Median latency vs size (batch {batch})")
    (outdir / REPORT_HTML).write_text(html_report("mnnpipe benchmark", [("Models", models), ("Latency", lat)], png, notes))
    payload = {
        "metrics": result.metrics,
        "rows": [r.model_dump() for r in result.rows],
        "models": [s.model_dump() for s in result.models],
        "machine": result.machine,
        "memory_method": MEMORY_METHOD,
        "mnn_source_built": [r.model_dump() for r in result.mnn_source_built],
    }
    (outdir / METRICS_FILE).write_text(json.dumps(payload, indent=2))


register(name="benchmark", spec=Spec, result=Result, run=run, stage="measure", model_input="models")
