"""torch -> ONNX, with the TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`).

Why not the dynamo exporter (torch 2.13's default), measured here: it takes 5-10 s even for an
8x8 digits CNN (0.1-0.3 s with the TorchScript exporter), it cannot emit opset < 18 for models
whose ops changed in 18 ("Failed to convert the model to the target version 17", the file is
then silently left at 18), and it prints pages of warnings. A torch.export `.pt2` program cannot
go through the TorchScript exporter directly ("Calling train() is not supported"), so its
`.module()` is traced first: one exporter for every torch format, and the requested opset is
what the file gets.

`nn.MultiheadAttention` / `nn.TransformerEncoderLayer` in eval mode take PyTorch's "fast path"
(`aten::_native_multi_head_attention`, `aten::_transformer_encoder_layer_fwd`), which no ONNX
exporter knows: the fast path is switched off for the export (plain MatMul/Softmax ops come out).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from mnnpipe.errors import ToolError, first_line

__all__ = ["DEFAULT_OPSET", "export_onnx", "output_count"]

DEFAULT_OPSET = 17


def output_count(model: nn.Module, example: tuple[torch.Tensor, ...]) -> int:
    """How many tensors the model returns for `example` (a tuple/list counts each element)."""
    with torch.no_grad():
        out = model(*example)
    return len(out) if isinstance(out, (tuple, list)) else 1


def _is_exported_program_module(model: nn.Module) -> bool:
    # `torch.export.load(...).module()` returns an fx GraphModule; plain modules and ScriptModules
    # go to the exporter as they are.
    return isinstance(model, torch.fx.GraphModule) and not isinstance(model, torch.jit.ScriptModule)


def export_onnx(
    model: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: str | Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str] | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
) -> list[str]:
    """Export `model` (eval mode) to `path`; return the output names written into the graph.

    `dynamic_batch` marks dimension 0 of every input and output as symbolic, so the ONNX and the
    .mnn made from it accept any batch size. Raises ToolError when the exporter fails (an
    unsupported op, data-dependent control flow) or writes a model the ONNX checker rejects.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not _is_exported_program_module(model):  # an exported program's module refuses .eval()
        model = model.eval()
    n_out = output_count(model, example)
    names_out = list(output_names) if output_names else (["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)])
    if len(names_out) != n_out:
        raise ToolError(f"the model returns {n_out} outputs but {len(names_out)} output names were given")
    dynamic_axes = {n: {0: "batch"} for n in [*input_names, *names_out]} if dynamic_batch else None
    log = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log), torch.no_grad(), _without_mha_fastpath():
            warnings.simplefilter("ignore")  # TracerWarnings and the "legacy exporter" notice
            if _is_exported_program_module(model):
                model = torch.jit.trace(model, example, check_trace=False)
            torch.onnx.export(
                model,
                example,
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=list(input_names),
                output_names=names_out,
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
        onnx.checker.check_model(str(path))
    except Exception as exc:  # the exporter raises many types (UnsupportedOperatorError, RuntimeError...)
        path.unlink(missing_ok=True)
        raise ToolError(f"torch.onnx.export failed ({type(exc).__name__}: {first_line(exc, 300)}){_remedy(str(exc), model)}") from exc
    return names_out


@contextlib.contextmanager
def _without_mha_fastpath():
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _remedy(message: str, model: nn.Module) -> str:
    """What the user can do about an export failure we know (empty when we know none)."""
    if "_native_multi_head_attention" in message or "_transformer_encoder_layer_fwd" in message:
        return (
            "; PyTorch's attention fast path is baked into this traced model: trace it under "
            "torch.backends.mha.set_fastpath_enabled(False), or convert a state-dict + factory"
        )
    if "unknown rank" in message and isinstance(model, torch.jit.ScriptModule):
        return "; a traced or TorchScript model carries no shapes for the exporter: convert a state-dict + factory or an ONNX file instead"
    return ""
