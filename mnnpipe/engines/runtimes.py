"""Load a model of any format and run it: torch, ONNX Runtime, MNN (and OpenVINO, engines.peers) — one interface.

    runner = open_model(ref, path, threads=2)          # ModelRef + its local file
    outputs = runner.run([x])                          # list of numpy arrays, one per output

Timing: engines.timing (`time_runner`); in a confined process of its own per model, with peak
memory: engines.measure (`MeasureServer`, `measure_isolated`).

Threads: torch uses `torch.set_num_threads` (process-wide; fine in a child), ONNX Runtime
`intra_op_num_threads` (inter-op 1), MNN the runtime key `numThread`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from mnnpipe.errors import InputError, first_line
from mnnpipe.specs import ModelRef

__all__ = [
    "ModelRunner",
    "OnnxRunner",
    "MnnRunner",
    "TorchRunner",
    "open_model",
]


class ModelRunner(Protocol):
    """A loaded model: positional numpy inputs in, numpy outputs out (one per model output)."""

    input_names: list[str]
    output_names: list[str]

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]: ...


class TorchRunner:
    """A torch module in eval mode, run under no_grad."""

    def __init__(self, model: Any, input_names: list[str]) -> None:
        self.model = model
        self.input_names = input_names
        self.output_names: list[str] = []

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        import torch

        try:
            with torch.no_grad():
                out = self.model(*[torch.from_numpy(np.ascontiguousarray(a)) for a in inputs])
        except (RuntimeError, AssertionError, ValueError, TypeError) as exc:
            # almost always inputs that do not fit the model (channels, rank, a .pt2 shape guard)
            raise InputError(f"the torch model cannot run on inputs {_describe(self.input_names, inputs)} ({first_line(exc, 240)})") from None
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        if not self.output_names:
            self.output_names = ["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))]
        return [o.detach().float().numpy() for o in outs]


class OnnxRunner:
    """An ONNX Runtime CPU session."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(inputs) != len(self.input_names):
            raise InputError(f"the ONNX model takes inputs {self.input_names}, got {len(inputs)} arrays")
        try:
            return list(self.session.run(None, dict(zip(self.input_names, inputs))))
        except Exception as exc:  # onnxruntime's InvalidArgument/Fail are not exported types
            raise InputError(f"ONNX Runtime cannot run on inputs {_describe(self.input_names, inputs)} ({first_line(exc, 240)})") from None


class MnnRunner:
    """An MNN module via engines.mnn.load_session."""

    def __init__(
        self,
        path: Path,
        threads: int,
        precision: str,
        input_names: Sequence[str] | None = None,
        output_names: Sequence[str] | None = None,
    ) -> None:
        from mnnpipe.engines.mnn import load_session

        self.session = load_session(
            path,
            threads=threads,
            precision=precision,
            input_names=list(input_names) if input_names else None,
            output_names=list(output_names) if output_names else None,
        )
        self.input_names = self.session.input_names
        self.output_names = self.session.output_names

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        try:
            return self.session.run(list(inputs))
        except (IndexError, RuntimeError, ValueError) as exc:
            # MNN prints a shape error to stderr and returns nothing (IndexError downstream)
            raise InputError(f"MNN cannot run {self.session.path.name} on inputs {_describe(self.input_names, inputs)}") from None


def _describe(names: Sequence[str], inputs: Sequence[np.ndarray]) -> str:
    names = list(names) + [f"#{i}" for i in range(len(names), len(inputs))]
    return ", ".join(f"'{n}' {list(np.shape(a))}" for n, a in zip(names, inputs))


def open_model(
    ref: ModelRef,
    path: Path,
    *,
    threads: int = 1,
    precision: str = "normal",
    input_names: Sequence[str] | None = None,
) -> ModelRunner:
    """Load `path` (the local file of `ref`) with the runtime that fits its format.

    `precision` applies to MNN only. Raises InputError for a missing, corrupt or unloadable file.
    """
    if not path.is_file():
        raise InputError(f"{ref.uri}: model file not found")
    if ref.format == "mnn":
        return MnnRunner(path, threads, precision)
    if ref.format == "openvino":
        from .peers import OpenVinoRunner

        return OpenVinoRunner(path, threads)
    if ref.format == "onnx":
        try:
            return OnnxRunner(path, threads)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise InputError(f"{ref.uri}: not a loadable ONNX model ({first_line(exc, 240)})") from None
    import torch

    from mnnpipe.modelio import load_torch

    torch.set_num_threads(int(threads))
    return TorchRunner(load_torch(ref, path), list(input_names or ["input"]))
