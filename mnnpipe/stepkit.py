"""The step kit: what several steps do the same way, written once.

What needs the step's context (fetching and loading the inputs a spec names) is on
`StepContext` (`ctx.dataset(...)`, `ctx.torch_model(...)`); these helpers need none. The shared
sub-specs (`TrainingOptions`, `max_accuracy_drop_field`) are in `mnnpipe.specs`, and the first
line of a foreign exception is `mnnpipe.errors.first_line`.
"""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, Any

import numpy as np

from .specs import TensorSpec, Tolerance, TrainingOptions

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from torch import nn

    from .train import FitConfig

#: numpy's type for each TensorSpec dtype.
NP_DTYPES = {"float32": np.float32, "float64": np.float64, "int64": np.int64, "int32": np.int32, "uint8": np.uint8}

#: How closely a saved model must reproduce the model in memory it was saved from.
SAVED_MODEL_TOLERANCE = Tolerance(max_abs_error=1e-4, min_cosine=0.9999, min_top1_agreement=1.0)


# --------------------------------------------------------------------------- random inputs


def random_tensor(t: TensorSpec, rng: np.random.Generator, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """One array of `t`'s dtype and shape (or `shape`), drawn uniformly from `t.range`: floats in
    [low, high), integers in [ceil(low), ceil(high)) (at least the one value ceil(low))."""
    lo, hi = t.range
    size = t.shape if shape is None else shape
    dtype = NP_DTYPES[t.dtype]
    if t.dtype in ("float32", "float64"):
        return rng.uniform(lo, hi, size=size).astype(dtype)
    low = int(np.ceil(lo))
    return rng.integers(low, max(low + 1, int(np.ceil(hi))), size=size).astype(dtype)


def random_inputs(inputs: list[TensorSpec], n: int, seed: int) -> list[list[np.ndarray]]:
    """`n` samples; each a list of arrays (one per input) drawn uniformly from the input's range."""
    rng = np.random.default_rng(seed)
    return [[random_tensor(t, rng) for t in inputs] for _ in range(n)]


# --------------------------------------------------------------------------- training


def fit_config(options: TrainingOptions, seed: int, **overrides: Any) -> FitConfig:
    """The `mnnpipe.train.FitConfig` a step trains with: every field of `options` (a
    TrainingOptions sub-spec, with the fields its step adds) that FitConfig has, the seed, then
    `overrides` (the step's own settings, e.g. distillation's temperature)."""
    from .train import FitConfig

    known = {f.name for f in fields(FitConfig)}
    values = {name: getattr(options, name) for name in type(options).model_fields if name in known}
    return FitConfig(**{**values, "seed": seed, **overrides})


# --------------------------------------------------------------------------- saved models


def save_verified_torchscript(
    model: nn.Module, example: torch.Tensor, x: np.ndarray, path: Path, what: str
) -> tuple[torch.jit.ScriptModule, np.ndarray]:
    """Save `model` as TorchScript at `path` (traced on `example`; a ScriptModule as it is), load
    it back and check it reproduces `model` on the samples `x`: tracing bakes in one control-flow
    path. StepFailed (`what` names the file) when it does not. Returns the reloaded module and
    `model`'s outputs on `x`, one row per sample, for checking further saved forms against."""
    import torch

    from .modelio import save_torchscript
    from .train import predict

    if isinstance(model, torch.jit.ScriptModule):
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save(str(path))
    else:
        save_torchscript(model, (example,), path)
    reloaded = torch.jit.load(str(path), map_location="cpu")
    reference = predict(model, x)
    check_reproduces(reference, predict(reloaded, x), what)
    return reloaded, reference


def check_reproduces(reference: np.ndarray, outputs: np.ndarray, what: str) -> None:
    """StepFailed unless `outputs` (one row per sample) match `reference` within SAVED_MODEL_TOLERANCE."""
    from .verify import check, compare

    check(compare(list(reference), list(outputs)), SAVED_MODEL_TOLERANCE, what)
