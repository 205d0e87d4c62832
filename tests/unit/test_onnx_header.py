"""engines.onnx_header.read_opset against onnx's own parser."""

from __future__ import annotations

from pathlib import Path

import pytest

onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from mnnpipe.engines.onnx_header import read_opset  # noqa: E402


def _model(opsets: list[tuple[str, int]], weight_elems: int) -> onnx.ModelProto:
    import numpy as np

    w = numpy_helper.from_array(np.arange(weight_elems, dtype=np.float32).reshape(1, -1), "w")
    node = helper.make_node("Add", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weight_elems])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weight_elems])], initializer=[w],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets], producer_name="t")


@pytest.mark.parametrize(
    "opsets,expected",
    [([("", 13)], 13), ([("com.microsoft", 1), ("", 17)], 17), ([("ai.onnx", 11)], 11), ([("com.microsoft", 1)], None)],
)
def test_matches_onnx(tmp_path: Path, opsets, expected) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_model(opsets, 300_000), str(path))  # 1.2 MB of weights ahead of nothing we need
    assert read_opset(path) == expected
    parsed = onnx.load(str(path))
    assert expected == next((o.version for o in parsed.opset_import if o.domain in ("", "ai.onnx")), None)


def test_not_a_protobuf(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError):
        read_opset(bad)
