"""Read an ONNX file's opset without parsing its graph or weights.

``onnx.load`` parses the whole ModelProto, initializers included (``load_external_data=False``
only skips *external* weight files): on VGG19 that is +1.1 GB of peak memory to learn one
number. The opset sits in ModelProto field 8 (``opset_import``, repeated OperatorSetIdProto:
field 1 ``domain`` string, field 2 ``version`` int64), beside field 7 (``graph``, the bulk). This
walks the top-level protobuf fields (https://protobuf.dev/programming-guides/encoding/) and
seeks over every length-delimited field except ``opset_import``, so it reads a few hundred bytes.
"""

from __future__ import annotations

import os
from typing import BinaryIO

__all__ = ["read_opset"]

_OPSET_IMPORT = 8  # ModelProto.opset_import
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5  # protobuf wire types


def _varint(f: BinaryIO) -> int | None:
    """A base-128 varint, or None at the end of the file."""
    value, shift = 0, 0
    while True:
        b = f.read(1)
        if not b:
            if shift:
                raise ValueError("the file ends inside a varint")
            return None
        value |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _opset_entry(data: bytes) -> tuple[str, int]:
    """(domain, version) of one serialized OperatorSetIdProto."""
    import io

    f, domain, version = io.BytesIO(data), "", 0
    while (key := _varint(f)) is not None:
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            value = _varint(f)
            if field == 2:
                version = value or 0
        elif wire == _LEN:
            n = _varint(f) or 0
            chunk = f.read(n)
            if field == 1:
                domain = chunk.decode("utf-8", "replace")
        elif wire in (_I64, _I32):
            f.read(8 if wire == _I64 else 4)
        else:
            raise ValueError(f"wire type {wire} in opset_import")
    return domain, version


def read_opset(path: str | os.PathLike[str]) -> int | None:
    """The default-domain (ai.onnx) opset of an ONNX model file; None when it declares none.
    Raises ValueError for bytes that are not a protobuf message."""
    size = os.path.getsize(path)
    found: int | None = None
    with open(path, "rb") as f:
        while (key := _varint(f)) is not None:
            field, wire = key >> 3, key & 7
            if field == 0:
                raise ValueError("field number 0: not a protobuf message")
            if wire == _VARINT:
                _varint(f)
            elif wire in (_I64, _I32):
                f.seek(8 if wire == _I64 else 4, os.SEEK_CUR)
            elif wire == _LEN:
                n = _varint(f)
                if n is None or f.tell() + n > size:
                    raise ValueError("a field runs past the end of the file")
                if field == _OPSET_IMPORT:
                    domain, version = _opset_entry(f.read(n))
                    if domain in ("", "ai.onnx") and found is None:
                        found = version
                else:
                    f.seek(n, os.SEEK_CUR)
            else:
                raise ValueError(f"wire type {wire}: not a protobuf message")
    return found
