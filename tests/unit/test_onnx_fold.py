"""engines.onnx_fixups.fold_at_static_shapes: convert's last resort when MNN gets a graph's shape
arithmetic wrong (a real sentence-embedding model: cosine 0.25 as exported, 0.999994 folded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from mnnpipe.engines.onnx_fixups import fold_at_static_shapes


class _ExpandIdiom(torch.nn.Module):
    """`buffer[:, :n].expand(batch, n)`: exported with a dynamic batch as Shape / Equal / Where arithmetic."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.tt = torch.nn.Embedding(32, 8), torch.nn.Embedding(2, 8)
        self.register_buffer("token_type", torch.zeros(1, 16, dtype=torch.long))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, n = ids.shape
        return self.emb(ids) + self.tt(self.token_type[:, :n].expand(b, n))


def _ops(path: Path) -> list[str]:
    import onnx

    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_shape_arithmetic_is_folded_away_with_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    src, dst = tmp_path / "m.onnx", tmp_path / "folded.onnx"
    torch.onnx.export(
        _ExpandIdiom().eval(), (torch.randint(0, 32, (1, 16)),), str(src), dynamo=False, opset_version=17,
        input_names=["ids"], output_names=["y"], dynamic_axes={"ids": {0: "batch"}, "y": {0: "batch"}},
    )  # fmt: skip
    assert {"Shape", "Where"} <= set(_ops(src))  # the premise: the idiom is there

    assert fold_at_static_shapes(src, dst, {"ids": (1, 16)})

    assert not {"Shape", "Where", "Equal", "ConstantOfShape"} & set(_ops(dst))
    ids = np.random.default_rng(0).integers(0, 32, (1, 16), dtype=np.int64)
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]  # noqa: E731
    np.testing.assert_array_equal(run(src), run(dst))


def test_a_declared_rank_that_does_not_fit_is_no_fold(tmp_path):
    src = tmp_path / "m.onnx"
    torch.onnx.export(_ExpandIdiom().eval(), (torch.randint(0, 32, (1, 16)),), str(src), dynamo=False, opset_version=17, input_names=["ids"])

    assert not fold_at_static_shapes(src, tmp_path / "folded.onnx", {"ids": (1, 16, 1)})
