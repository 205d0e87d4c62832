"""MNN engine: convert ONNX to .mnn, full-int8 post-training quantization, run and inspect models.

Facts this module is built on (MNN 3.6.1 from PyPI, measured):

* The converter and quantizer are called through ``_tools`` (the wheel's extension module), never
  through ``MNN.tools`` (its import starts a telemetry logger that pip-installs packages) nor the
  ``mnnconvert``/``mnnquant`` console scripts (``mnnquant`` always aborts with std::length_error).
* Both tools return True even when they fail (a corrupt ONNX file, a missing model), ignore
  unknown flags, and can abort or segfault. So each call runs in its own process
  (``_mnn_worker.py``), and success means: exit status 0 AND a non-empty output file.
* Full-int8 models keep the op type ``Convolution``; what makes them int8 is the op's quantization
  parameters (``symmetricQuan`` / ``quanParameter.scaleIn``) and int8 ``quantInfo`` on tensors.
  ``op_types`` reports such convolutions as ``Convolution[int8]`` so callers can prove it.
* KL calibration segfaults on models that contain a ``ReduceMean`` (MNN op ``Reduction``), e.g.
  ``x.mean((2, 3))`` as global pooling; EMA works on them, and ``nn.AdaptiveAvgPool2d(1)`` works
  with KL. ``feature_quantize_method: ADMM`` aborts.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mnnpipe.errors import InputError, ToolError

__all__ = [
    "MnnSession",
    "convert_onnx_to_mnn",
    "load_session",
    "op_types",
    "parse_debug_distances",
    "quantize_int8",
    "quantizer_blockers",
]

_WORKER = Path(__file__).with_name("_mnn_worker.py")
_TAIL_LINES = 4  # log lines quoted in a ToolError message
_RETURN_LINES = 20  # log lines returned to the caller on success
_PRECISIONS = {"normal", "high", "low"}


def import_mnn() -> Any:
    """Import MNN once with file descriptor 1 pointed at /dev/null: its C++ core prints a
    "The device supports: ..." banner to stdout on import, which would corrupt the JSON that
    `mnnpipe run` prints there."""
    if "MNN" in sys.modules:
        return sys.modules["MNN"]
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            import MNN  # noqa: F401

            # The banner sits in C stdio's buffer when stdout is a pipe: flush it into /dev/null
            # before fd 1 is restored, or it comes out later, ahead of our JSON.
            import ctypes

            ctypes.CDLL(None).fflush(None)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    return sys.modules["MNN"]


def _log_lines(text: str) -> list[str]:
    """Log lines without blanks, progress carriage returns or MNN's import banner."""
    lines = []
    for raw in text.replace("\r", "\n").splitlines():
        line = raw.strip()
        if line and not line.startswith("The device supports:"):
            lines.append(line)
    return lines


def signal_name(returncode: int) -> str:
    """SIGSEGV for a child's return code -11 (Python's negated signal number)."""
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _run_tool(tool: str, args: Sequence[str], *, output: Path, timeout_s: float) -> list[str]:
    """Run ``tool`` (mnnconvert/mnnquant) in a child process; return its log lines.

    Raises ToolError on a timeout, a nonzero exit, a crash, or when ``output`` is missing or empty
    afterwards (the tools report success even when they wrote nothing).
    """
    from mnnpipe.sandbox import check_confine_policy

    check_confine_policy()
    output.unlink(missing_ok=True)  # a stale file must not pass for this run's output
    # A private cwd per call: the converter writes `.__convert_external_data.bin` into its cwd
    # under that fixed name, so two tools sharing a cwd publish each other's weights. Every path
    # in `args` must therefore be absolute (the callers resolve them).
    with tempfile.TemporaryFile(mode="w+b") as log, tempfile.TemporaryDirectory(prefix=f"{tool}-cwd-") as cwd:
        cmd = [sys.executable, str(_WORKER), tool, *args]
        # the tool parses untrusted files in C++: it may write only its cwd and its output's folder
        env = {**os.environ, "MNNPIPE_TOOL_WRITABLE": os.pathsep.join([cwd, str(output.absolute().parent)])}
        try:
            proc = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, cwd=cwd, env=env
            )
            reason: str | None = None
            if proc.returncode < 0:
                reason = f"crashed with {signal_name(proc.returncode)}"
            elif proc.returncode != 0:
                reason = f"exit status {proc.returncode}"
        except subprocess.TimeoutExpired:  # subprocess.run has already killed the child
            reason = f"timed out after {timeout_s:g} s"
        log.seek(0)
        lines = _log_lines(log.read().decode("utf-8", errors="replace"))
    if reason is None and (not output.is_file() or output.stat().st_size == 0):
        reason = f"wrote no output file {output.name}"
    if reason is not None:
        output.unlink(missing_ok=True)  # never leave a half-written model behind
        tail = " | ".join(lines[-_TAIL_LINES:]) or "no log output"
        raise ToolError(f"{tool} {reason}: {tail}")
    return lines


def _onnx_unreadable(path: Path) -> bool:
    """True when ``path`` is not an ONNX model at all (checked only after the converter failed)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return True
    return model.ir_version == 0 or len(model.graph.node) == 0


def convert_onnx_to_mnn(
    onnx_path: str | os.PathLike[str],
    mnn_path: str | os.PathLike[str],
    *,
    fp16: bool = False,
    weight_quant_bits: int | None = None,
    weight_quant_asymmetric: bool = False,
    weight_quant_block: int = 0,
    hqq: bool = False,
    detect_sparse: bool = False,
    compression_params: str | os.PathLike[str] | None = None,
    timeout_s: float = 600,
) -> str:
    """Convert an ONNX model to .mnn; return the last lines of the converter's log.

    ``compression_params`` (--compressionParamsFile) is an MNN_compression.proto Pipeline, e.g.
    the int8 scales of a quantization-aware fine-tune (mnnpipe.qat): those layers come out int8.

    ``detect_sparse`` (--detectSparseSpeedUp) stores sparse weights compactly; it is the only
    way the converter shrinks a pruned-to-zeros model (see benchmarks/results/prune.md).

    ``fp16`` halves storage only (weights go back to float at load). ``weight_quant_bits`` (2-8)
    stores conv/matmul weights as low-bit integers (size only, no speed-up with memory mode 0);
    the converter ignores it when ``fp16`` is set too, so that combination is refused here.
    ``weight_quant_block`` > 0 quantizes in blocks of that many input channels; ``hqq`` implies
    asymmetric quantization. Raises InputError for a missing or unreadable ONNX file and
    ToolError when the converter fails.
    """
    src, dst = Path(onnx_path).absolute(), Path(mnn_path).absolute()  # the tool runs in its own cwd
    if not src.is_file():
        raise InputError(f"ONNX model not found: {src}")
    if fp16 and weight_quant_bits:
        raise ValueError("fp16 and weight_quant_bits are exclusive (MNN silently drops the weight quant)")
    if weight_quant_bits is not None and not 2 <= weight_quant_bits <= 8:
        raise ValueError(f"weight_quant_bits must be in 2..8, got {weight_quant_bits}")
    args = ["-f", "ONNX", "--modelFile", str(src), "--MNNModel", str(dst), "--bizCode", "mnnpipe"]
    if fp16:
        args.append("--fp16")
    if weight_quant_bits:
        args += ["--weightQuantBits", str(weight_quant_bits)]
        if weight_quant_asymmetric:
            args.append("--weightQuantAsymmetric")
        if weight_quant_block > 0:
            args += ["--weightQuantBlock", str(weight_quant_block)]
        if hqq:
            args.append("--hqq")
    if detect_sparse:
        args.append("--detectSparseSpeedUp")
    if compression_params is not None:
        args += ["--compressionParamsFile", str(Path(compression_params).absolute())]
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        lines = _run_tool("mnnconvert", args, output=dst, timeout_s=timeout_s)
    except ToolError as exc:
        if _onnx_unreadable(src):
            raise InputError(f"not a readable ONNX model: {src} ({exc})") from exc
        raise
    return "\n".join(lines[-_RETURN_LINES:])


# Op types MNN 3.6.1's quantizer crashes on (SIGSEGV), measured on tiny models (see
# benchmarks/results/mnn-int8-findings.md): (op type, calibration methods it crashes under,
# what to do). skip_quant_op_names does NOT avoid any of them (measured: the crash happens while
# the quantizer runs the float model, before it looks at the skip list).
_QUANTIZER_CRASHES = (
    ("LRN", ("KL",), "use activation_method EMA"),
    ("Reduction[MEAN]", ("KL",), "use activation_method EMA, or nn.AdaptiveAvgPool2d(1) instead of x.mean()"),
    (
        "If",
        ("KL", "EMA"),
        "no calibration method avoided it (measured with KL and EMA): remove the data-dependent branch "
        "(torch's nn.LocalResponseNorm exports one for its 5-D pad; ONNX's own LRN op quantizes under EMA), "
        "or use mode weight-only",
    ),
    (
        "While",
        ("KL", "EMA"),
        "recurrent layers (nn.GRU, nn.LSTM) export as a While loop, which no calibration method survives "
        "(measured with KL and EMA on a 2-layer GRU and LSTM): use mode weight-only",
    ),
)


def quantizer_blockers(mnn_path: str | os.PathLike[str], method: str) -> list[str]:
    """Why MNN's quantizer would crash on this model with ``method`` (KL/EMA/ADMM): one sentence per
    op type present that is known to crash it, naming the op, a layer and what to do. Empty when
    none is known. Reads only the model's op list (``mnn_file.read_ops``)."""
    from .mnn_file import read_ops

    ops = read_ops(mnn_path)
    problems = []
    for kind, methods, advice in _QUANTIZER_CRASHES:
        if method not in methods:
            continue
        hits = [op.name for op in ops if op.type == kind or f"{op.type}[{op.reduction}]" == kind]
        if hits:
            shown = kind.replace("Reduction[MEAN]", "ReduceMean")
            problems.append(
                f"the model has {len(hits)} {shown} op(s) (first: '{hits[0]}'), which crash MNN 3.6.1's quantizer "
                f"under {method} calibration: {advice}"
            )
    return problems


def quantize_int8(
    src_mnn: str | os.PathLike[str],
    dst_mnn: str | os.PathLike[str],
    config: dict[str, Any],
    *,
    timeout_s: float = 1800,
) -> str:
    """Full int8 post-training quantization (weights and activations) with MNN's offline tool.

    ``config`` is the quantizer's JSON config (see benchmarks/results/mnn-int8-findings.md), e.g.
    ``{"format": "RGB", "mean": [127.5]*3, "normal": [1/127.5]*3, "width": 64, "height": 64,
    "path": "calib/", "used_image_num": 20, "feature_quantize_method": "KL",
    "weight_quantize_method": "MAX_ABS"}``; for non-image inputs use ``"input_type": "sequence"``.
    Returns the last lines of the tool's log, or all of it when ``config["debug"]`` is true (then it
    holds per-tensor cosine distances: see ``parse_debug_distances``). The tool also writes
    ``<dst>.json`` with the scales it chose. Raises InputError
    when the model or the calibration folder is missing, ToolError when the tool fails.
    """
    src, dst = Path(src_mnn).absolute(), Path(dst_mnn).absolute()  # the tool runs in its own cwd
    if not src.is_file():
        raise InputError(f"MNN model not found: {src}")
    config = dict(config)
    method = str(config.get("feature_quantize_method", "KL"))
    try:
        blockers = quantizer_blockers(src, method)
    except ValueError as exc:  # mnn_file.MnnFileError: not a .mnn flatbuffer
        raise InputError(f"not a loadable MNN model: {src} ({exc})") from None
    if blockers:
        raise InputError(f"{src.name}: {'; '.join(blockers)}")
    if "path" in config:
        calib = Path(config["path"])
        if not calib.is_dir():
            raise InputError(f"calibration folder not found: {calib}")
        config["path"] = str(calib.resolve()) + os.sep  # the tool joins path + file name
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mnnquant-") as tmp:
        cfg_path = Path(tmp) / "quant.json"
        cfg_path.write_text(json.dumps(config))
        try:
            lines = _run_tool("mnnquant", [str(src), str(dst), str(cfg_path)], output=dst, timeout_s=timeout_s)
        except ToolError as exc:
            if "SIGSEGV" in str(exc) and method == "KL":
                raise ToolError(
                    f"{exc} (MNN 3.6.1's KL calibration crashes on some op types, e.g. ReduceMean, LRN"
                    ", 3-D average pooling over channels, and activations holding -inf such as an attention mask's"
                    " masked_fill; try activation_method EMA)"
                ) from exc
            raise
    return "\n".join(lines if config.get("debug") else lines[-_RETURN_LINES:])


_DEBUG_LINE = re.compile(
    r"^(?P<op>.+?) (?P<tensor>(?:input|output)_tensor_\d+):\s+cos distance: (?P<cos>\S+), overflow ratio: (?P<ovf>\S+)$"
)


def parse_debug_distances(log: str) -> list[dict[str, Any]]:
    """Per-tensor fidelity from a ``debug: true`` quantization log, for a sensitivity table.

    Each line the tool prints as ``<op> output_tensor_0:  cos distance: 0.9997, overflow ratio:
    0.00001`` (cosine similarity of the int8 vs float tensor, share of values clipped) becomes
    ``{"op", "tensor", "cosine", "overflow"}``. Ops named ``..._raster_N`` are layout copies MNN
    inserted, not model layers.
    """
    rows = []
    for line in log.splitlines():
        m = _DEBUG_LINE.match(line.strip())
        if m:
            rows.append({"op": m["op"], "tensor": m["tensor"], "cosine": float(m["cos"]), "overflow": float(m["ovf"])})
    return rows


class MnnSession:
    """A loaded .mnn model: ``run`` takes NCHW numpy arrays and returns NCHW numpy arrays."""

    def __init__(self, module: Any, path: Path, input_names: list[str], output_names: list[str]) -> None:
        self._module = module
        self.path = path
        self.input_names = input_names
        self.output_names = output_names

    def run(self, inputs: dict[str, np.ndarray] | Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run once. A dict is ordered by ``input_names``; a list must already be in that order."""
        import_mnn()
        import MNN.expr as F

        if isinstance(inputs, dict):
            missing = [n for n in self.input_names if n not in inputs]
            if missing:
                raise ValueError(f"missing inputs {missing}; the model takes {self.input_names}")
            arrays = [inputs[n] for n in self.input_names]
        else:
            arrays = list(inputs)
        if self.input_names and len(arrays) != len(self.input_names):
            raise ValueError(f"expected {len(self.input_names)} inputs {self.input_names}, got {len(arrays)}")
        vars_ = []
        for a in arrays:
            a = np.asarray(a)
            if np.issubdtype(a.dtype, np.integer):
                vars_.append(F.const(np.ascontiguousarray(a, dtype=np.int32), list(a.shape), F.NCHW, F.int))
            else:
                vars_.append(F.const(np.ascontiguousarray(a, dtype=np.float32), list(a.shape), F.NCHW))
        outs = self._module.forward(vars_)
        if not isinstance(outs, (list, tuple)):
            outs = [outs]
        expected = len(self.output_names) or 1
        if len(outs) != expected:
            # MNN reports a shape error on stderr and returns no outputs instead of raising.
            shapes = [list(np.shape(a)) for a in arrays]
            raise InputError(f"{self.path}: the model cannot run on input shapes {shapes} (MNN computed {len(outs)} of {expected} outputs)")
        result = []
        for o in outs:
            if o.data_format == F.NC4HW4:  # MNN's packed internal layout; callers expect NCHW
                o = F.convert(o, F.NCHW)
            result.append(np.array(o.read(), copy=True))
        return result


def load_session(
    path: str | os.PathLike[str],
    *,
    threads: int = 1,
    precision: str = "normal",
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
) -> MnnSession:
    """Load a .mnn model on the CPU backend; names default to those stored in the model.

    ``threads`` maps to the runtime key ``numThread`` (MNN reads no other spelling; its default is
    4). ``precision`` "low" lets MNN use fp16/bf16 arithmetic where the CPU has it. Raises
    InputError when the file is missing or is not a loadable .mnn model.
    """
    import_mnn()
    import MNN.nn as nn

    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
    p = Path(path)
    if not p.is_file():
        raise InputError(f"MNN model not found: {p}")
    rt = nn.create_runtime_manager(
        ({"backend": "CPU", "precision": precision, "numThread": int(threads), "memory": 0},)
    )
    try:
        module = nn.load_module_from_file(str(p), list(input_names or []), list(output_names or []), runtime_manager=rt)
    except Exception as exc:  # MNN raises SystemError with no message for unreadable files
        raise InputError(f"not a loadable MNN model: {p}") from exc
    if module is None:
        raise InputError(f"not a loadable MNN model: {p}")
    info = module.get_info()
    return MnnSession(
        module,
        p,
        list(input_names) if input_names else list(info.get("inputNames", [])),
        list(output_names) if output_names else list(info.get("outputNames", [])),
    )


def op_types(mnn_path: str | os.PathLike[str], *, timeout_s: float = 600) -> dict[str, int]:
    """Count the op types in a .mnn model, e.g. ``{"Convolution[int8]": 4, "Pooling": 1, ...}``.

    MNN's in-process loader (``MNN.expr.load_as_list``) shows every conv as plain "Convolution",
    so this reads each op's type and quantization tables from the file's flatbuffer
    (``mnn_file.read_ops``; no weights are read). Convolutions are labelled ``[int8]`` (full int8),
    ``[intN-weights]`` (weight-only quant) or ``[fp16-weights]``. ``timeout_s`` is unused (kept for
    callers of the former converter-dump version). Raises InputError for a missing/unreadable file.
    """
    from .mnn_file import MnnFileError, read_ops

    p = Path(mnn_path)
    if not p.is_file():
        raise InputError(f"MNN model not found: {p}")
    try:
        ops = read_ops(p)
    except MnnFileError as exc:
        raise InputError(f"not a loadable MNN model: {p} ({exc})") from None
    return dict(collections.Counter(op.label for op in ops))
