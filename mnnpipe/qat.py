"""Quantization-aware fine-tuning for MNN, without mnncompress (see benchmarks/results/qat.md).

A torch model's nn.Linear / nn.Conv2d layers are wrapped with int8 fake quantization (symmetric,
per-tensor activations with a running max|x| / 127 scale, per-output-channel weights), fine-tuned
on labelled data, exported to ONNX unwrapped, and their scales written as MNN's compression
parameters (MNN_compression.proto), which `MNNConvert --compressionParamsFile` turns into int8
layers with exactly those scales.

The proto's message classes are built here from a descriptor that repeats the field numbers of
tools/converter/source/compression/MNN_compression.proto (MNN 3.6.1) for the messages written:
mnncompress, the package that ships a compiled copy, pins an old protobuf and a telemetry SDK
that break this environment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

_INT8_MAX = 127
_RUNNING = 0.9  # weight of the old max in the activation observers' running max


class _RoundSTE(torch.autograd.Function):
    """round() whose gradient passes straight through (the usual fake-quant estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ARG004 - autograd's signature
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return grad


def _fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.clamp(_RoundSTE.apply(x / scale), -_INT8_MAX, _INT8_MAX) * scale


class _Observer(nn.Module):
    """Fake-quantizes an activation tensor; in training mode it also tracks the running max|x|."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("amax", torch.zeros(()))

    @property
    def scale(self) -> float:
        return float(self.amax) / _INT8_MAX

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            m = x.detach().abs().max()
            self.amax = m if float(self.amax) == 0 else _RUNNING * self.amax + (1 - _RUNNING) * m
        if float(self.amax) == 0:
            return x
        return _fake_quant(x, self.amax / _INT8_MAX)


def _weight_scales(w: torch.Tensor) -> torch.Tensor:
    """One scale per output channel, max|w| / 127 (what MNN's MAX_ABS weight method uses)."""
    return w.detach().abs().flatten(1).amax(1).clamp(min=1e-12) / _INT8_MAX


class _FakeQuantLayer(nn.Module):
    """A Linear/Conv2d run with int8 fake quantization on its input, weights and output."""

    def __init__(self, layer: nn.Linear | nn.Conv2d) -> None:
        super().__init__()
        self.layer, self.input_q, self.output_q = layer, _Observer(), _Observer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.layer.weight
        shape = (-1,) + (1,) * (w.dim() - 1)
        wq = _fake_quant(w, _weight_scales(w).reshape(shape))
        x = self.input_q(x)
        if isinstance(self.layer, nn.Linear):
            y = nn.functional.linear(x, wq, self.layer.bias)
        else:
            y = self.layer._conv_forward(x, wq, self.layer.bias)
        return self.output_q(y)


@dataclass(frozen=True)
class LayerScales:
    """The int8 scales of one layer, keyed in `QatModel.scales` by the layer's module name."""

    input: float
    output: float
    weight: list[float]


class QatModel:
    """`model` with every nn.Linear / nn.Conv2d wrapped for fake quantization (in place)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers: dict[str, _FakeQuantLayer] = {}
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, (nn.Linear, nn.Conv2d)) and not isinstance(module, _FakeQuantLayer):
                    wrapped = _FakeQuantLayer(child)
                    setattr(module, child_name, wrapped)
                    self.layers[f"{name}.{child_name}" if name else child_name] = wrapped
        if not self.layers:
            raise ValueError("the model has no nn.Linear or nn.Conv2d layer to quantize")

    def observe(self, x: torch.Tensor) -> None:
        """Set the activation ranges from one batch, without training the weights."""
        self.model.train()
        with torch.no_grad():
            self.model(x)
        self.model.eval()

    def fine_tune(self, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, batch_size: int = 32, seed: int = 0) -> None:
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        self.observe(xt[:256])
        opt = torch.optim.Adam(self.model.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            self.model.train()
            for idx in torch.randperm(len(xt), generator=gen).split(batch_size):
                loss = nn.functional.cross_entropy(self.model(xt[idx]), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.model.eval()

    @property
    def scales(self) -> dict[str, LayerScales]:
        return {
            name: LayerScales(q.input_q.scale, q.output_q.scale, _weight_scales(q.layer.weight).tolist())
            for name, q in self.layers.items()
        }

    def strip(self) -> dict[str, LayerScales]:
        """Put the plain (fine-tuned) layers back, for export; return their scales."""
        scales = self.scales
        for name, q in self.layers.items():
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, q.layer)
        return scales


# --------------------------------------------------------------------------- MNN compression params


def _pipeline_class():
    """MNN.Compression.Pipeline, with the parts of MNN_compression.proto (proto2) this module writes."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    opt, rep, req = F.LABEL_OPTIONAL, F.LABEL_REPEATED, F.LABEL_REQUIRED
    ns = ".MNN.Compression."
    fd = descriptor_pb2.FileDescriptorProto(name="mnnpipe_MNN_compression.proto", package="MNN.Compression", syntax="proto2")

    def message(parent, name: str, fields: list[tuple]) -> descriptor_pb2.DescriptorProto:
        m = parent.add(name=name)
        for number, field, kind, label, type_name in fields:
            f = m.field.add(name=field, number=number, type=kind, label=label)
            if type_name:
                f.type_name = ns + type_name
        return m

    layer = message(
        fd.message_type,
        "LayerQuantizeParams",
        [
            (1, "input", F.TYPE_MESSAGE, rep, "LayerQuantizeParams.ActivationParams"),
            (2, "weight", F.TYPE_MESSAGE, rep, "LayerQuantizeParams.WeightParams"),
            (3, "output", F.TYPE_MESSAGE, rep, "LayerQuantizeParams.ActivationParams"),
        ],
    )
    bounds = [(F.TYPE_INT32, opt, None)] * 2
    message(
        layer.nested_type,
        "ActivationParams",
        [(1, "name", F.TYPE_STRING, req, None), (2, "bits", F.TYPE_INT32, opt, None), (3, "scales", F.TYPE_FLOAT, rep, None),
         (4, "zero_point", F.TYPE_INT32, opt, None), (5, "clamp_min", *bounds[0]), (6, "clamp_max", *bounds[1])],
    )
    message(
        layer.nested_type,
        "WeightParams",
        [(1, "name", F.TYPE_STRING, req, None), (2, "bits", F.TYPE_INT32, opt, None), (3, "scales", F.TYPE_FLOAT, rep, None),
         (4, "clamp_min", *bounds[0]), (5, "clamp_max", *bounds[1])],
    )
    message(fd.message_type, "QuantizeParams", [(4, "layer", F.TYPE_MESSAGE, rep, "LayerQuantizeParams")])
    # type is an enum (QUANTIZE = 0) in MNN's proto: on the wire identical to an int32
    message(fd.message_type, "CompressionAlgo", [(1, "type", F.TYPE_INT32, opt, None), (2, "quant_params", F.TYPE_MESSAGE, opt, "QuantizeParams")])
    message(
        fd.message_type,
        "Pipeline",
        [(1, "version", F.TYPE_STRING, req, None), (2, "algo", F.TYPE_MESSAGE, rep, "CompressionAlgo"), (3, "mnn_uuid", F.TYPE_STRING, opt, None)],
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("MNN.Compression.Pipeline"))


def write_compression_params(onnx_path: Path, scales: dict[str, LayerScales], dst: Path) -> list[str]:
    """Write MNN's compression params for the ONNX export of a stripped QatModel; return the layers
    whose ONNX node was not found (they stay float). A layer's node is the Conv/Gemm/MatMul whose
    weight input is the initializer `<module name>.weight`."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    by_weight = {n.input[1]: n for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1}
    pipeline = _pipeline_class()(version="0.0.0")
    layers = pipeline.algo.add(type=0).quant_params.layer
    missing = []
    for name, s in scales.items():
        node = by_weight.get(f"{name}.weight")
        if node is None:
            missing.append(name)
            continue
        layer = layers.add()
        bounds = {"bits": 8, "clamp_min": -_INT8_MAX, "clamp_max": _INT8_MAX}
        layer.input.add(name=node.input[0], scales=[s.input], zero_point=0, **bounds)
        layer.output.add(name=node.output[0], scales=[s.output], zero_point=0, **bounds)
        layer.weight.add(name=node.input[1], scales=s.weight, **bounds)
    dst.write_bytes(pipeline.SerializeToString())
    return missing


# --------------------------------------------------------------------------- the quantize step's qat mode


def quantize_aware(model: nn.Module, train, input_name: str, input_shape: tuple[int, ...], workdir: Path, *,
                   epochs: int, lr: float, seed: int, timeout_s: float) -> tuple[Path, list[str]]:
    """Fine-tune `model` (a torch nn.Module, changed in place) with int8 fake quantization on the
    labelled Dataset `train`, and convert it to an int8 .mnn in `workdir`. Returns the .mnn and the
    layers left in float (no ONNX node found for them)."""
    from .engines.mnn import convert_onnx_to_mnn
    from .engines.onnx_export import export_onnx
    from .errors import InputError

    if isinstance(model, torch.jit.ScriptModule):
        raise InputError("mode qat wraps the model's nn.Linear/nn.Conv2d layers: give a state-dict with its factory, not TorchScript")
    if train.y is None:
        raise InputError("calibration: mode qat fine-tunes on labels; the dataset has none (an npz needs 'y')")
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        qat = QatModel(model)
    except ValueError as exc:
        raise InputError(f"model: {exc}") from None
    qat.fine_tune(train.x, train.y, epochs=epochs, lr=lr, seed=seed)
    scales = qat.strip()
    workdir.mkdir(parents=True, exist_ok=True)
    onnx_path, params, dst = workdir / "qat.onnx", workdir / "qat.params", workdir / "qat.mnn"
    export_onnx(model.eval(), (torch.zeros(input_shape),), onnx_path, input_names=[input_name], dynamic_batch=False)
    float_layers = write_compression_params(onnx_path, scales, params)
    convert_onnx_to_mnn(onnx_path, dst, compression_params=params, timeout_s=timeout_s)
    return dst, float_layers
