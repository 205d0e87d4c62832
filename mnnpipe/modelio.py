"""Reading and writing torch models without running untrusted code.

Trust model: TorchScript archives are loaded with torch's own loader (its unpickler resolves
only TorchScript types), torch.export archives through `load_exported_safely` (torch.export.load
alone would unpickle parts of the file unsafely), state-dicts with `torch.load(weights_only=True)`.
TorchScript and torch.export graphs are code: `graph_allowlist` refuses any that could reach
the host (files, prints, custom classes) before they run.
The only code imported is a `factory` the spec names, which the pipeline author chose.
"""

from __future__ import annotations

import importlib
import os
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import graph_allowlist
from .errors import InputError, SpecError, first_line
from .specs import ModelRef


def import_factory(path: str) -> Callable[..., nn.Module]:
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise SpecError(f"factory '{path}' cannot be imported ({type(e).__name__}: {e})") from None
    if not callable(obj):
        raise SpecError(f"factory '{path}' is not callable")
    return obj


def build(factory: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    try:
        model = import_factory(factory)(**(kwargs or {}))
    except TypeError as e:
        raise SpecError(f"factory '{factory}' rejected its kwargs ({e})") from None
    if not isinstance(model, nn.Module):
        raise SpecError(f"factory '{factory}' returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def load_torch(ref: ModelRef, path: Path) -> nn.Module:
    """Load a torch model in eval mode. Corrupt or wrong-format files raise InputError."""
    if not path.is_file():
        raise InputError(f"{ref.uri}: model file not found")
    if path.stat().st_size == 0:
        raise InputError(f"{ref.uri}: model file is empty")
    check_archive_size(ref.uri, path)
    try:
        if ref.format == "torchscript":
            graph_allowlist.check_archive_code(ref.uri, path)
            model = torch.jit.load(str(path), map_location="cpu")
            graph_allowlist.check_torchscript(ref.uri, model)
        elif ref.format == "torch-export":
            model = load_exported_safely(ref, path).module()
        elif ref.format == "state-dict":
            model = build(ref.factory or "", ref.factory_kwargs)
            if not is_zip(path) and not _starts_like_pickle(path):
                raise InputError(f"{ref.uri}: not a torch.save file (neither a zip archive nor a pickle)")
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            if not isinstance(state, dict):
                raise InputError(f"{ref.uri}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
            _fit_weights(model, state, ref)
        else:
            raise SpecError(f"model.format '{ref.format}' is not a torch format")
    except (InputError, SpecError):
        raise
    except Exception as e:  # torch raises many types for corrupt archives and unsafe pickles
        msg = first_line(e, 160)
        if "weights_only" in msg or "Unsupported global" in str(e):
            msg = "contains pickled objects that are not plain tensors; refused (weights_only=True)"
        raise InputError(f"{ref.uri}: not a loadable {ref.format} model ({msg})") from None
    if ref.factory and ref.format in ("torchscript", "torch-export"):
        # The weights of a traced/exported model, in the Python class the factory builds: what
        # tools that rewrite or hook nn.Modules (pruning, feature distillation) need.
        module = build(ref.factory, ref.factory_kwargs)
        _fit_weights(module, {k: v.detach() for k, v in model.state_dict().items()}, ref)
        return module.eval()
    if ref.format == "torch-export":
        return model  # an exported program's module() refuses .eval() ("not supported yet"); it is already in eval form
    return model.eval()


MODEL_MAX_BYTES_ENV = "MNNPIPE_MAX_MODEL_BYTES"
MODEL_MAX_BYTES = 8 * 2**30  # uncompressed, all members; VGG19's fp32 weights are 0.55 GiB
MODEL_MAX_MEMBERS = 100_000  # torch writes one member per storage
MODEL_MAX_RATIO = 100.0  # torch stores members uncompressed (ratio 1); a zip bomb is 1000x+


def max_model_bytes() -> int:
    raw = os.environ.get(MODEL_MAX_BYTES_ENV, "").strip()
    if not raw:
        return MODEL_MAX_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise SpecError(f"{MODEL_MAX_BYTES_ENV}: expected a positive number of bytes, got {raw!r}")
    return value


def check_archive_size(label: str, path: Path) -> None:
    """Torch model archives (TorchScript, .pt2, zip state-dicts) are zips that torch inflates into
    memory as declared: refuse, before loading, one that declares more than MNNPIPE_MAX_MODEL_BYTES
    (default 8 GiB), too many members or a member that inflates like a zip bomb."""
    from .data import check_zip_declared

    if not zipfile.is_zipfile(path):
        return  # a legacy pickle state-dict or not a model at all: the loader says which
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise InputError(f"{label}: not a readable model archive ({type(e).__name__})") from None
    check_zip_declared(label, infos, max_bytes=max_model_bytes(), max_members=MODEL_MAX_MEMBERS, max_ratio=MODEL_MAX_RATIO)


def _fit_weights(model: nn.Module, state: dict, ref: ModelRef) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = str(e).strip().splitlines() or ["mismatch"]
        detail = " ".join(line.strip() for line in lines[:2])
        raise InputError(f"{ref.uri}: weights do not fit factory '{ref.factory}' ({detail})") from None


def load_exported_safely(ref: ModelRef, path: Path) -> torch.export.ExportedProgram:
    """torch.export.load, without the parts of it that run code from the file.

    Measured on torch 2.13: torch.export.load unpickles with weights_only=False in three places:
    example inputs fall back to it when the safe load fails (a `__reduce__` in
    sample_inputs/*.pt then runs), weights and constants marked `use_pickle` always use it, and
    opaque-object constants go through plain `pickle.loads`. So: refuse archives whose payload
    configs ask for pickled weights or non-tensor constants, and force weights_only=True on every
    torch.load during the call (TORCH_FORCE_WEIGHTS_ONLY_LOAD is read at each call).
    """
    import json

    try:
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if not name.endswith("_config.json") or "/data/" not in name:
                    continue
                config = json.loads(z.read(name)).get("config", {})
                for fqn, meta in config.items():
                    pickled = bool(meta.get("use_pickle"))
                    foreign = "/constants/" in name and not str(meta.get("path_name", "")).startswith("tensor_")
                    if pickled or foreign:
                        raise InputError(
                            f"{ref.uri}: '{fqn}' is stored as a pickled object, which torch.export.load would "
                            "unpickle unsafely; refused (save tensors-only programs)"
                        )
    except zipfile.BadZipFile:
        raise InputError(f"{ref.uri}: not a loadable torch-export model (not a .pt2 zip archive)") from None
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        program = torch.export.load(str(path))
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous
    graph_allowlist.check_exported(ref.uri, program)
    return program


def is_zip(path: Path) -> bool:
    return zipfile.is_zipfile(path)


def _starts_like_pickle(path: Path) -> bool:
    """torch.save's legacy format is a pickle: protocol 2+ starts with the PROTO opcode 0x80."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def save_torchscript(model: nn.Module, example: tuple[torch.Tensor, ...], path: Path) -> Path:
    """Trace to TorchScript: reloadable without the Python class (needed once channels are pruned)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
    traced.save(str(path))
    return path


def save_exported(model: nn.Module, example: tuple[torch.Tensor, ...], path: Path) -> Path:
    """Save a torch.export `.pt2` archive, the format torch recommends going forward."""
    path.parent.mkdir(parents=True, exist_ok=True)
    program = torch.export.export(model.eval(), example)
    torch.export.save(program, str(path))
    return path


def example_inputs(shapes: list[tuple[int, ...]], seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(*s, generator=g) for s in shapes)
