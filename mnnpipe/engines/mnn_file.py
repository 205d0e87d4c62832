"""Read what a .mnn file says about its ops straight from its flatbuffer, without loading weights.

A .mnn file is one FlatBuffers buffer whose root is MNN's ``Net`` table (schema/default/MNN.fbs
and CaffeOp.fbs of github.com/alibaba/MNN at tag 3.6.1, the wheel's version). This reader walks
only the few fields mnnpipe needs: ``Net.oplists`` -> each ``Op``'s name, type and, for
convolutions, which quantization tables its ``Convolution2D`` parameter carries; and the
``Input`` ops' dims. The file is memory-mapped, so the weights are never read: the cost is a
few pages per op whatever the model's size (a JSON dump of VGG19 took 740 MB and 4 GB to parse).

FlatBuffers layout used here (https://flatbuffers.dev/internals/): the buffer starts with a
uint32 offset to the root table. A table starts with an int32 ``soffset``; its vtable is at
``table - soffset``: uint16 vtable size, uint16 table size, then one uint16 per field id (0 =
field absent, else the field's offset from the table start). A sub-table/vector/string field
holds a uint32 offset relative to the field's own position; a vector is a uint32 count followed
by its elements. A union field ``main`` takes two ids: ``main_type`` (uint8) then ``main``.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MnnFileError", "OpInfo", "read_ops", "read_inputs"]

# Field ids (declaration order in the .fbs; a union counts twice).
_NET_OPLISTS = 3  # Net: bizCode, extraTensorDescribe, extraInfo, oplists
_OP_MAIN_TYPE, _OP_MAIN, _OP_NAME, _OP_TYPE = 1, 2, 3, 5  # Op: inputIndexes, main_type, main, name, outputIndexes, type
_CONV_QUAN, _CONV_SYMMETRIC = 3, 4  # Convolution2D: common, weight, bias, quanParameter, symmetricQuan
_IDST_TYPE, _IDST_SCALE_IN, _IDST_BITS = 2, 5, 7  # IDSTQuan: buffer, alpha, type, useInt32, quantScale, scaleIn, scaleOut, aMaxOrBits
_INPUT_DIMS = 0  # Input: dims
_REDUCTION_OPERATION = 0  # ReductionParam: operation (ReductionType, byte)
# OpParameter union members (1-based in declaration order; 0 = NONE).
_PARAM_CONVOLUTION2D, _PARAM_INPUT, _PARAM_REDUCTION = 9, 21, 50
_REDUCTION_TYPES = ("SUM", "ASUM", "SUMSQ", "MEAN", "MAXIMUM", "MINIMUM", "PROD", "ANY", "ALL")  # enum ReductionType

_CONV_TYPES = {"Convolution", "ConvolutionDepthwise", "Deconvolution", "DeconvolutionDepthwise"}

# enum OpType of MNN.fbs (3.6.1): values 0..123 in order, then the explicitly numbered ones.
_OP_TYPES_LOW = (
    'AbsVal', 'QuantizedAdd', 'ArgMax', 'AsString', 'InstanceNorm', 'BatchToSpaceND', 'Copy',
    'BinaryOp', 'Bnll', 'Cast', 'Concat', 'Const', 'Convolution', 'ConvolutionDepthwise', 'Crop',
    'CropAndResize', 'ImageProcess', 'Deconvolution', 'DeconvolutionDepthwise', 'Dequantize',
    'DetectionOutput', 'Dropout', 'Eltwise', 'ELU', 'Unique', 'Exp', 'ExpandDims', 'Fill',
    'Flatten', 'Im2Col', 'Gather', 'GatherV2', 'Im2Seq', 'InnerProduct', 'Input', 'Interp', 'Log',
    'LRN', 'LSTM', 'MatMul', 'MoE', 'NonMaxSuppression', 'NonMaxSuppressionV2', 'Normalize', 'Pack',
    'Padding', 'Permute', 'Pooling', 'Power', 'PReLU', 'PriorBox', 'Proposal', 'QuantizedAvgPool',
    'QuantizedBiasAdd', 'QuantizedConcat', 'QuantizedDepthwiseConv2D', 'QuantizedLogistic',
    'RasterAndInterpolate', 'QuantizedMaxPool', 'Texture', 'RasterDiff', 'QuantizedReshape',
    'QuantizedSoftmax', 'QuantizeMaxMin', 'QuantizeV2', 'Range', 'Rank', 'ReduceJoin', 'Reduction',
    'ReLU', 'ReLU6', 'RequantizationRange', 'Requantize', 'Reshape', 'Resize', 'RNN', 'ROIPooling',
    'Scale', 'Selu', 'Seq2Out', 'Shape', 'Sigmoid', 'Size', 'Slice', 'SliceTf', 'Softmax',
    'SpaceToBatchND', 'SpatialProduct', 'Col2Im', 'Segment', 'Squeeze', 'StridedSlice', 'CastLike',
    'StringSplit', 'StringToNumber', 'TanH', 'TfQuantizedConv2D', 'Threshold', 'Tile', 'TopKV2',
    'Transpose', 'UnaryOp', 'Unpack', 'Where', 'Moments', 'RNNSequenceGRU', 'BatchMatMul',
    'Unsqueeze', 'CosineSimilarity', 'DepthToSpace', 'SpaceToDepth', 'ReverseSequence', 'Pooling3D',
    'Convolution3D', 'MatrixBandPart', 'GatherND', 'DetectionPostProcess', 'UnravelIndex',
    'ScatterNd', 'OneHot', 'BroadcastTo', 'Dilation2D', 'Interp3D',
)
_OP_TYPES_HIGH = {
    128: 'Raster', 129: 'ConvertTensor', 130: 'ArgMin', 131: 'LinSpace', 132: 'RandomUniform',
    133: 'TensorArray', 134: 'TensorArraySize', 135: 'TensorArrayRead', 136: 'TensorArrayWrite',
    137: 'TensorArrayGather', 138: 'TensorArrayScatter', 139: 'TensorArraySplit',
    140: 'TensorArrayConcat', 141: 'LSTMBlockCell', 142: 'Reverse', 143: 'ROIAlign',
    144: 'RandomNormal', 145: 'TensorArrayInsert', 146: 'TensorArrayErase', 147: 'EyeLike',
    148: 'CumSum', 149: 'Det', 150: 'CumProd', 151: 'ScatterElements', 152: 'GatherElements',
    153: 'Svd', 154: 'Histogram', 155: 'DynamicQuant', 156: 'Stft', 256: 'Plugin', 257: 'Select',
    258: 'ZerosLike', 259: 'Broastcast', 260: 'SetDiff1D', 261: 'ReluGrad', 262: 'Identity',
    263: 'PoolGrad', 264: 'SoftmaxGrad', 265: 'Conv2DBackPropFilter', 266: 'TrainableParam',
    267: 'BatchNorm', 268: 'ConvTranspose3D', 269: 'ZeroGrad', 299: 'Attention', 300: 'FmhaV2',
    301: 'Fmhca', 302: 'SeqLen2Spatial', 303: 'SplitGeLU', 304: 'GroupNorm', 305: 'LinearAttention',
    306: 'RoPE', 512: 'Extra', 513: 'ConvInt8', 514: 'Int8ToFloat', 515: 'DepthwiseConvInt8',
    517: 'FloatToInt8', 518: 'EltwiseInt8', 600: 'While', 601: 'If', 603: 'LayerNorm',
    604: 'GridSample',
}


class MnnFileError(ValueError):
    """The bytes are not a .mnn flatbuffer (an offset points outside the file, or no ops)."""


@dataclass(frozen=True)
class OpInfo:
    name: str
    type: str  # MNN's op type name, e.g. "Convolution"
    label: str  # the type, convs marked by storage: "Convolution[int8]", "[int8-weights]", "[fp16-weights]"
    reduction: str | None = None  # for Reduction ops: SUM, MEAN, MAXIMUM, ...


class _Buffer:
    """Bounds-checked little-endian reads of FlatBuffers tables from a byte buffer."""

    def __init__(self, data: mmap.mmap | bytes) -> None:
        self.data, self.size = data, len(data)

    def _unpack(self, fmt: str, pos: int) -> int:
        if pos < 0 or pos + struct.calcsize(fmt) > self.size:
            raise MnnFileError(f"offset {pos} outside the file ({self.size} bytes)")
        return struct.unpack_from(fmt, self.data, pos)[0]

    def root(self) -> int:
        return self._unpack("<I", 0)

    def field_pos(self, table: int, field_id: int) -> int | None:
        """Absolute position of a field's value, or None when the table does not store it."""
        vtable = table - self._unpack("<i", table)
        vtable_size = self._unpack("<H", vtable)
        slot = 4 + 2 * field_id
        if slot + 2 > vtable_size:
            return None
        offset = self._unpack("<H", vtable + slot)
        return table + offset if offset else None

    def has_any_field(self, table: int) -> bool:
        """True when the table stores at least one field (what a JSON dump shows as non-empty)."""
        vtable = table - self._unpack("<i", table)
        return any(self._unpack("<H", vtable + slot) for slot in range(4, self._unpack("<H", vtable), 2))

    def scalar(self, table: int, field_id: int, fmt: str, default: int | float) -> int | float:
        pos = self.field_pos(table, field_id)
        return default if pos is None else self._unpack(fmt, pos)

    def ref(self, table: int, field_id: int) -> int | None:
        """Position of the sub-table/vector/string a field points to."""
        pos = self.field_pos(table, field_id)
        return None if pos is None else pos + self._unpack("<I", pos)

    def vector(self, pos: int, fmt: str) -> list[int]:
        count = self._unpack("<I", pos)
        width = struct.calcsize(fmt)
        if pos + 4 + count * width > self.size:
            raise MnnFileError(f"vector of {count} at {pos} runs past the end of the file")
        return list(struct.unpack_from(f"<{count}{fmt}", self.data, pos + 4))

    def tables(self, pos: int) -> list[int]:
        return [pos + 4 + 4 * i + off for i, off in enumerate(self.vector(pos, "I"))]

    def string(self, pos: int | None) -> str:
        if pos is None:
            return ""
        count = self._unpack("<I", pos)
        if pos + 4 + count > self.size:
            raise MnnFileError(f"string at {pos} runs past the end of the file")
        return bytes(self.data[pos + 4 : pos + 4 + count]).decode("utf-8", errors="replace")


def _op_type_name(value: int) -> str:
    if 0 <= value < len(_OP_TYPES_LOW):
        return _OP_TYPES_LOW[value]
    return _OP_TYPES_HIGH.get(value, f"OpType{value}")


def _conv_label(buf: _Buffer, op: int, kind: str) -> str:
    """Same rules as the JSON-based labels mnnpipe used before (MNN's converter dump):
    quanParameter present and non-empty, plus symmetricQuan or a non-zero scaleIn -> full int8;
    quanParameter.type 3 -> fp16 weights; otherwise weight-only with aMaxOrBits bits."""
    if buf.scalar(op, _OP_MAIN_TYPE, "<B", 0) != _PARAM_CONVOLUTION2D:
        return kind
    conv = buf.ref(op, _OP_MAIN)
    quan = None if conv is None else buf.ref(conv, _CONV_QUAN)
    if conv is None or quan is None or not buf.has_any_field(quan):
        return kind
    symmetric = buf.ref(conv, _CONV_SYMMETRIC)
    if (symmetric is not None and buf.has_any_field(symmetric)) or buf.scalar(quan, _IDST_SCALE_IN, "<f", 0.0):
        return f"{kind}[int8]"  # int8 weights AND int8 activations (full int8 PTQ)
    if buf.scalar(quan, _IDST_TYPE, "<i", 0) == 3:
        return f"{kind}[fp16-weights]"
    return f"{kind}[int{buf.scalar(quan, _IDST_BITS, '<i', 8)}-weights]"  # weight-only quant, float compute


def _reduction(buf: _Buffer, op: int) -> str | None:
    if buf.scalar(op, _OP_MAIN_TYPE, "<B", 0) != _PARAM_REDUCTION or (param := buf.ref(op, _OP_MAIN)) is None:
        return None
    value = int(buf.scalar(param, _REDUCTION_OPERATION, "<b", 0))
    return _REDUCTION_TYPES[value] if 0 <= value < len(_REDUCTION_TYPES) else str(value)


def _walk(path: Path, visit) -> list:
    size = os.path.getsize(path)
    if size < 8:
        raise MnnFileError(f"{size} bytes is too short for a .mnn model")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        buf = _Buffer(data)
        net = buf.root()
        oplists = buf.ref(net, _NET_OPLISTS)
        if oplists is None:
            raise MnnFileError("the model has no op list")
        try:
            return [row for op in buf.tables(oplists) if (row := visit(buf, op)) is not None]
        except (UnicodeDecodeError, struct.error) as exc:
            raise MnnFileError(str(exc)) from None


def read_ops(path: str | os.PathLike[str]) -> list[OpInfo]:
    """Every op of the model's main graph, in file order. Raises MnnFileError for bytes that are
    not a .mnn flatbuffer, OSError for a missing file."""

    def visit(buf: _Buffer, op: int) -> OpInfo:
        kind = _op_type_name(int(buf.scalar(op, _OP_TYPE, "<i", 0)))
        label = _conv_label(buf, op, kind) if kind in _CONV_TYPES else kind
        return OpInfo(buf.string(buf.ref(op, _OP_NAME)), kind, label, _reduction(buf, op) if kind == "Reduction" else None)

    ops = _walk(Path(path), visit)
    if not ops:
        raise MnnFileError("the model has no ops")
    return ops


def read_inputs(path: str | os.PathLike[str]) -> dict[str, list[int]]:
    """{input op name: dims as stored (-1 or 0 for a dynamic dimension)} of the main graph."""

    def visit(buf: _Buffer, op: int) -> tuple[str, list[int]] | None:
        if _op_type_name(int(buf.scalar(op, _OP_TYPE, "<i", 0))) != "Input":
            return None
        dims: list[int] = []
        if buf.scalar(op, _OP_MAIN_TYPE, "<B", 0) == _PARAM_INPUT and (param := buf.ref(op, _OP_MAIN)) is not None:
            dims_pos = buf.ref(param, _INPUT_DIMS)
            dims = [] if dims_pos is None else buf.vector(dims_pos, "i")
        return buf.string(buf.ref(op, _OP_NAME)), dims

    return dict(_walk(Path(path), visit))
