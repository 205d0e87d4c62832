"""Peer runtimes to time beside MNN on x86: ONNX Runtime int8 and OpenVINO fp32 / int8.

A .mnn's latency means little without the runtimes a user could deploy instead on the same CPU.
Each peer is built here from the model's fp32 ONNX file, with the setting that is fast on x86
(measured, benchmarks/results/peers.md), and then timed by the benchmark step like any model:

* ``onnxruntime-int8-u8s8``: ONNX Runtime static quantization, QDQ format, **unsigned** (QUInt8)
  activations and signed per-channel weights: the U8S8 kernels that x86 VNNI runs fast. Signed
  activations (S8S8) take a slower path on x86 (1.6-2.9x slower, measured).
* ``openvino-fp32``: OpenVINO's CPU plugin on the ONNX model converted to OpenVINO IR.
* ``openvino-int8``: that IR quantized by NNCF's post-training quantization (MinMax ranges,
  mixed preset: symmetric weights, asymmetric activations), OpenVINO's documented int8 path.

OpenVINO and NNCF are the optional extra ``mnnpipe[peers]``; ONNX Runtime is a core dependency.
All peers are calibrated on the same samples as MNN's quantizer when the benchmark has a dataset.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError, ToolError, first_line

__all__ = ["PEERS", "OpenVinoRunner", "available", "build_peer", "size_bytes"]

PEERS: dict[str, str] = {
    "onnxruntime-int8-u8s8": "ONNX Runtime static int8: QDQ, activations QUInt8 (unsigned), weights QInt8 per channel, "
    "MinMax calibration",
    "openvino-fp32": "OpenVINO CPU plugin, fp32 (ONNX -> IR, precision hint f32), latency hint",
    "openvino-int8": "OpenVINO CPU plugin, int8 from NNCF post-training quantization (preset mixed, MinMax subset of "
    "calibration samples), latency hint",
}


def available(name: str) -> bool:
    """True when the packages the peer needs are installed."""
    if name.startswith("openvino"):
        needs = ["openvino"] + (["nncf"] if name == "openvino-int8" else [])
        return all(importlib.util.find_spec(n) is not None for n in needs)
    return importlib.util.find_spec("onnxruntime") is not None


def size_bytes(path: Path) -> int:
    """Bytes on disk: an OpenVINO IR is the .xml plus its .bin."""
    weights = path.with_suffix(".bin")
    return path.stat().st_size + (weights.stat().st_size if path.suffix == ".xml" and weights.is_file() else 0)


def _onnxruntime_u8s8(onnx_path: Path, dst: Path, samples: Sequence[np.ndarray], input_name: str) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{input_name: s} for s in samples])

        def get_next(self):
            return next(self.items, None)

    prepared = dst.with_name(dst.stem + "-prep.onnx")
    quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip
    prepared.unlink(missing_ok=True)
    return dst


def _openvino(onnx_path: Path, dst: Path, samples: Sequence[np.ndarray] | None) -> Path:
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    if samples is not None:
        import nncf

        model = nncf.quantize(model, nncf.Dataset(list(samples)), preset=nncf.QuantizationPreset.MIXED, subset_size=len(samples))
    ov.save_model(model, str(dst), compress_to_fp16=False)
    return dst


def build_peer(name: str, onnx_path: Path, samples: Sequence[np.ndarray], input_name: str, workdir: Path) -> Path:
    """Make peer ``name``'s model file from the fp32 ONNX model; ``samples`` (batch-1 arrays in the
    model's input layout) calibrate the int8 peers. Raises InputError for an unknown or
    uninstalled peer, ToolError when the peer's own tooling fails."""
    if name not in PEERS:
        raise InputError(f"peers: unknown peer '{name}'; known: {sorted(PEERS)}")
    if not available(name):
        raise InputError(f"peers: '{name}' needs OpenVINO (and NNCF for int8): pip install 'mnnpipe[peers]'")
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if name == "onnxruntime-int8-u8s8":
            return _onnxruntime_u8s8(onnx_path, workdir / f"{name}.onnx", samples, input_name)
        return _openvino(onnx_path, workdir / f"{name}.xml", samples if name == "openvino-int8" else None)
    except InputError:
        raise
    except Exception as exc:  # the quantizers raise their own types; one line names the peer and why
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:240]
        raise ToolError(f"peers: building '{name}' from {onnx_path.name} failed: {first}") from None


class OpenVinoRunner:
    """An OpenVINO IR (or ONNX) model compiled for the CPU with ``threads`` inference threads."""

    def __init__(self, path: Path, threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        try:
            self.compiled = core.compile_model(str(path), "CPU", config)
        except Exception as exc:
            raise InputError(f"not a loadable OpenVINO model: {path} ({first_line(exc)})") from None
        self.request = self.compiled.create_infer_request()
        self.input_names = [p.get_any_name() for p in self.compiled.inputs]
        self.output_names = [p.get_any_name() for p in self.compiled.outputs]

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(inputs) != len(self.input_names):
            raise InputError(f"the OpenVINO model takes inputs {self.input_names}, got {len(inputs)} arrays")
        results = self.request.infer([np.ascontiguousarray(a) for a in inputs])
        return [np.array(results[o]) for o in self.compiled.outputs]
