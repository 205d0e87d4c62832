"""prune: remove channels (structured) or zero weights (unstructured), then optionally recover.

Structured pruning removes whole conv channels and linear neurons physically with Torch-Pruning's
DepGraph, which keeps coupled layers consistent (residual adds, depthwise convs, concatenation,
batch norm). Channels are ranked by a criterion from `mnnpipe.importance`; the amount is a
channel ratio, or a parameter / MAC budget met by searching the ratio on a copy of the model.
Unstructured pruning zeroes the globally smallest weights; the masks are folded into the weights
and the reported sparsity is counted from the saved file.

`iterative_steps` > 1 prunes a little, fine-tunes, and repeats. A channel ratio follows one
Torch-Pruning pruner's own schedule (its `iterative_steps`, linear scheduler): after step k of K
every layer (uniform) or the model (global) has lost k/K of the ratio of its original channels.
A params / MACs budget moves k/K of the way to the budget (a bisection per step); unstructured
pruning reaches k/K of the sparsity. Recovery reuses `mnnpipe.train.fit` (optionally distilling
from the unpruned model). The output is TorchScript `model.pt` (a state-dict no longer fits the
original class once channels are gone) and `model.pt2` when torch.export handles the pruned model.

Findings (Torch-Pruning 1.6.1, torch 2.13): DepGraph needs a real nn.Module. A TorchScript
module has no module graph to rewrite, and a torch.export program's `.module()` refuses `.eval()`
("Calling eval() is not supported yet") and holds flattened parameters, so the input must be a
state-dict with its factory.
"""

from __future__ import annotations

import copy
import difflib
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator

from ..catalog import HandOff, register
from ..errors import InputError, SpecError, StepFailed, first_line
from ..specs import (
    DatasetRef, ModelRef, StepResult, StepSpec, Strict, TensorSpec, TrainingOptions, accuracy_drop_pp, exceeds_accuracy_budget,
    max_accuracy_drop_field,
)  # fmt: skip

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from ..data import Dataset
    from ..context import StepContext

log = logging.getLogger("mnnpipe.prune")

Importance = Literal["l1", "l2", "bn-scale", "taylor", "activation"]  # keys of mnnpipe.importance.CRITERIA
_SEARCH_ITERATIONS = 10  # bisection on the channel ratio: 2^-10 of the range is finer than one channel here


class Target(Strict):
    """How much to remove: a share of the channels, or a parameter / MAC budget."""

    by: Literal["channels", "params", "macs"] = Field(
        "channels",
        description="channels: remove `ratio` of the channels of each prunable layer (uniform) or of all of them "
        "(global); params / macs: prune until the model's parameter / multiply-accumulate count meets the budget.",
    )
    ratio: float | None = Field(
        None, description="Share to remove, in (0, 1): of the channels, parameters or MACs (as `by` says)."
    )
    count: int | None = Field(
        None, ge=1, description="Budget for `by` params or macs: keep at most this many parameters / MACs."
    )

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v < 1:
            raise ValueError(f"ratio must be in (0, 1) (share to remove), got {v}")
        return v

    @model_validator(mode="after")
    def _one_amount(self) -> Target:
        if (self.ratio is None) == (self.count is None):
            raise ValueError("give exactly one of ratio or count")
        if self.count is not None and self.by == "channels":
            raise ValueError("count applies to by 'params' or 'macs'; for channels give ratio")
        return self


class FineTune(TrainingOptions):
    """Recovery training after each pruning step (mnnpipe.train.fit; cosine learning-rate schedule)."""

    epochs: int = Field(3, ge=1, le=10_000, description="Epochs of fine-tuning after each pruning step.")
    dataset: DatasetRef = Field(description="Labelled training data (e.g. split 'train').")
    distill: bool = Field(False, description="Use the unpruned model as a distillation teacher.")
    temperature: float = Field(4.0, gt=0, le=100, description="Softmax temperature for distillation.")
    alpha: float = Field(0.7, ge=0, le=1, description="Weight of the distillation term when `distill` is on.")


class Spec(StepSpec):
    """Prune a torch model (structured or unstructured) and optionally fine-tune it back."""

    kind: Literal["prune"] = "prune"
    model: ModelRef = Field(
        description="The model to prune: a state-dict (.pth), TorchScript (.pt) or torch.export (.pt2) file with "
        "the `factory` that builds its architecture (its weights are loaded into that nn.Module, which "
        "Torch-Pruning rewrites); without `factory` only nn.Modules can be pruned, so .pt/.pt2 are refused."
    )
    input: TensorSpec | None = Field(
        None,
        description="Example input (shape with batch 1) used to trace dependencies and count MACs; None: taken from "
        "the first sample of `calibration`, `finetune.dataset` or `evaluation`.",
    )
    method: Literal["structured", "unstructured"] = Field(
        "structured",
        description="structured: remove channels/neurons physically (smaller, faster); unstructured: zero the "
        "globally smallest weights (same shapes and speed; compresses only where an encoder exploits zeros).",
    )
    importance: Importance = Field(
        "l1",
        description="Structured: how channels are ranked. l1/l2: weight magnitude; bn-scale: batch-norm |gamma|; "
        "taylor: |w x grad| on calibration data; activation: mean |output| on calibration data.",
    )
    target: Target = Field(
        default_factory=lambda: Target(ratio=0.3), description="Structured: how much to remove (default 30% of channels)."
    )
    scope: Literal["uniform", "global"] = Field(
        "uniform",
        description="Structured: uniform removes the same share from every layer; global ranks all channels together "
        "(layers may lose different shares, up to `max_layer_ratio`).",
    )
    max_layer_ratio: float = Field(
        0.9, gt=0, lt=1, description="Structured: no layer loses more than this share of its channels in one step."
    )
    round_to: int | None = Field(
        None, ge=1, le=256, description="Structured: keep channel counts multiples of this (e.g. 4 or 8 for SIMD)."
    )
    sparsity: float = Field(
        0.5, description="Unstructured: share of conv/linear weights set to zero, in (0, 1), ranked globally by |w|."
    )
    ignore: list[str] = Field(
        default_factory=list,
        description="Layer names (as in named_modules(), e.g. 'fc' or 'features.0.0') left untouched. The layer "
        "producing the model's output is always kept whole in structured pruning.",
    )
    iterative_steps: int = Field(1, ge=1, le=100, description="Prune in this many steps, fine-tuning after each.")
    calibration: DatasetRef | None = Field(
        None,
        description="Samples for data-driven importance (taylor, activation); None: `finetune.dataset`. Labels are "
        "used by taylor when present, else the model's own predictions.",
    )
    calibration_batches: int = Field(8, ge=1, le=10_000, description="At most this many batches of 32 samples for importance.")
    finetune: FineTune | None = Field(None, description="Recovery training after each step; None: no fine-tuning.")
    evaluation: DatasetRef | None = Field(
        None, description="Labelled data for accuracy before pruning, after pruning and after fine-tuning."
    )
    max_accuracy_drop: float | None = max_accuracy_drop_field(
        None, "of the final model below the original on `evaluation`", "None: unchecked."
    )
    export_pt2: bool = Field(True, description="Also write model.pt2 (torch.export) when the pruned model exports.")

    @field_validator("model")
    @classmethod
    def _prunable(cls, v: ModelRef) -> ModelRef:
        if v.format == "state-dict" or (v.factory and v.format in ("torchscript", "torch-export")):
            return v
        why = {
            "torchscript": "a TorchScript module has no nn.Module graph for Torch-Pruning's DepGraph to rewrite",
            "torch-export": "a torch.export program's module refuses .eval() and holds flattened parameters, "
            "which Torch-Pruning cannot rewrite",
        }.get(v.format, f"'{v.format}' is not a torch model")
        raise ValueError(
            f"format '{v.format}' cannot be pruned: {why}; name the architecture with `factory` "
            "(e.g. mnnpipe.models:mobilenet_v2) and `factory_kwargs`, or pass a state-dict (.pth) with them"
        )

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError(f"sparsity must be in (0, 1) (share of weights set to zero), got {v}")
        return v

    @field_validator("ignore")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not name or len(name) > 256:
                raise ValueError("layer names must be 1 to 256 characters")
        return v

    @model_validator(mode="after")
    def _data_available(self) -> Spec:
        data_driven = self.method == "structured" and self.importance in ("taylor", "activation")
        if data_driven and self.calibration is None and self.finetune is None:
            raise ValueError(f"importance '{self.importance}' needs data: give `calibration` or `finetune`")
        if self.input is None and not (self.calibration or self.finetune or self.evaluation):
            raise ValueError("input is required (example shape for tracing) when no dataset is given")
        if self.input is not None and self.input.shape[0] != 1:
            raise ValueError(f"input.shape must have batch 1, got {list(self.input.shape)}")
        if self.max_accuracy_drop is not None and self.evaluation is None:
            raise ValueError("max_accuracy_drop needs `evaluation` to measure accuracy on")
        return self


class StepRecord(Strict):
    """What one iterative step did."""

    step: int = Field(description="1-based step number.")
    params: int = Field(description="Parameters after this step's pruning.")
    macs: int = Field(description="Multiply-accumulates per sample after this step's pruning.")
    sparsity: float = Field(description="Share of zero conv/linear weights after this step's pruning.")
    accuracy_pruned: float | None = Field(None, description="Eval accuracy right after this step's pruning.")
    accuracy_finetuned: float | None = Field(None, description="Eval accuracy after this step's fine-tuning.")


class Result(StepResult):
    kind: Literal["prune"] = "prune"
    method: str = Field(description="structured or unstructured.")
    importance: str | None = Field(description="Channel criterion (structured only).")
    params_before: int = Field(description="Parameters of the input model.")
    params_after: int = Field(description="Parameters of the pruned model.")
    params_ratio: float = Field(description="params_after / params_before.")
    macs_before: int = Field(description="MACs per sample of the input model (tp.utils.count_ops_and_params).")
    macs_after: int = Field(description="MACs per sample of the pruned model (dense count: zeros are still multiplied).")
    macs_ratio: float = Field(description="macs_after / macs_before.")
    sparsity: float = Field(description="Zero share of conv/linear weights, counted in the saved model.pt.")
    zero_weights: int = Field(description="Zero conv/linear weights in the saved model.pt.")
    total_weights: int = Field(description="Conv/linear weights in the saved model.pt.")
    accuracy_before: float | None = Field(None, description="Eval accuracy of the input model.")
    accuracy_pruned: float | None = Field(None, description="Eval accuracy after the last pruning step, before its fine-tuning.")
    accuracy_finetuned: float | None = Field(None, description="Eval accuracy after the last fine-tuning (None without finetune).")
    accuracy_after: float | None = Field(None, description="Eval accuracy of the published model.")
    eval_samples: int = Field(0, description="Labelled samples the accuracies were measured on.")
    steps: list[StepRecord] = Field(default_factory=list, description="Per iterative step.")
    ignored_layers: list[str] = Field(default_factory=list, description="Layers left untouched.")
    channels: dict[str, list[int]] = Field(
        default_factory=dict, description="Output channels [before, after] per conv/linear layer that changed."
    )
    input_shape: list[int] = Field(description="Example input shape the model was traced with.")
    pt2_written: bool = Field(description="True when model.pt2 (torch.export) was written and verified.")
    pt2_error: str | None = Field(None, description="Why model.pt2 was not written, when it was not.")


PruneSpec, PruneResult = Spec, Result


# --------------------------------------------------------------------------- the step


def run(spec: Spec, ctx: StepContext) -> Result:
    from ..train import accuracy, predict, seed_everything

    seed_everything(spec.seed)
    model = ctx.torch_model(spec.model)
    labelled = "accuracy and fine-tuning need labels"
    train_set = ctx.dataset(spec.finetune.dataset, "finetune.dataset", labelled=labelled) if spec.finetune else None
    eval_set = ctx.dataset(spec.evaluation, "evaluation", labelled=labelled) if spec.evaluation else None
    calib_set = ctx.dataset(spec.calibration, "calibration") if spec.calibration else train_set
    example = _example_input(spec, calib_set or train_set or eval_set)
    _check_runs(model, example)

    ignored = _resolve_ignored(model, spec.ignore)
    if spec.method == "structured":
        ignored = list(dict.fromkeys(ignored + _output_layers(model, example)))
    before_channels = _out_channels(model)
    macs_before, params_before = _count(model, example)
    acc_before = accuracy(model, eval_set) if eval_set else None
    teacher_logits = None
    if spec.finetune and spec.finetune.distill:
        assert train_set is not None
        teacher_logits = predict(model, train_set.x)

    records: list[StepRecord] = []
    acc_pruned = acc_finetuned = None
    channel_pruning = _ChannelPruning(model, example, spec, ignored, calib_set, (macs_before, params_before)) if spec.method == "structured" else None
    for k in range(1, spec.iterative_steps + 1):
        if channel_pruning is not None:
            channel_pruning.step(k)
        else:
            _unstructured_step(model, spec, ignored, k)
        # unstructured masks keep every shape (and tp's counter cannot deepcopy a masked model)
        macs, params = _count(model, example) if spec.method == "structured" else (macs_before, params_before)
        acc_pruned = accuracy(model, eval_set) if eval_set else None
        acc_finetuned = None
        if spec.finetune:
            assert train_set is not None
            _finetune(model, train_set, spec, teacher_logits, ctx, k)
            acc_finetuned = accuracy(model, eval_set) if eval_set else None
        records.append(
            StepRecord(
                step=k, params=params, macs=macs, sparsity=_sparsity(model)[0],
                accuracy_pruned=acc_pruned, accuracy_finetuned=acc_finetuned,
            )
        )  # fmt: skip
        log.info("prune step %d/%d: %d params, %d MACs, accuracy %s", k, spec.iterative_steps, params, macs, acc_finetuned or acc_pruned)

    if spec.method == "unstructured":
        _fold_masks(model)
    model.eval()
    macs_after, params_after = _count(model, example)
    acc_after = accuracy(model, eval_set) if eval_set else None
    if spec.max_accuracy_drop is not None and acc_before is not None and acc_after is not None:
        drop_pp = accuracy_drop_pp(acc_before, acc_after)
        if exceeds_accuracy_budget(drop_pp, spec.max_accuracy_drop):
            raise StepFailed(
                f"accuracy fell from {acc_before:.2%} to {acc_after:.2%} ({drop_pp:.2f} points), more than max_accuracy_drop {spec.max_accuracy_drop} points"
            )

    verify_x = (eval_set or calib_set or train_set).x[:16] if (eval_set or calib_set or train_set) else example.numpy()
    zeros, total, pt2_error = _write_model(model, example, verify_x, spec.export_pt2, ctx)
    after_channels = _out_channels(model)
    changed = {n: [c, after_channels.get(n, 0)] for n, c in before_channels.items() if after_channels.get(n) != c}
    result = Result(
        output=spec.output,
        method=spec.method,
        importance=spec.importance if spec.method == "structured" else None,
        params_before=params_before,
        params_after=params_after,
        params_ratio=params_after / params_before,
        macs_before=macs_before,
        macs_after=macs_after,
        macs_ratio=macs_after / macs_before if macs_before else 1.0,
        sparsity=zeros / total if total else 0.0,
        zero_weights=zeros,
        total_weights=total,
        accuracy_before=acc_before,
        accuracy_pruned=acc_pruned,
        accuracy_finetuned=acc_finetuned,
        accuracy_after=acc_after,
        eval_samples=len(eval_set) if eval_set else 0,
        steps=records,
        ignored_layers=ignored,
        channels=changed,
        input_shape=list(example.shape),
        pt2_written=pt2_error is None and spec.export_pt2,
        pt2_error=pt2_error,
    )
    metrics = {
        "params_before": float(params_before), "params_after": float(params_after), "params_ratio": result.params_ratio,
        "macs_before": float(macs_before), "macs_after": float(macs_after), "macs_ratio": result.macs_ratio,
        "sparsity": result.sparsity,
    }  # fmt: skip
    for name in ("accuracy_before", "accuracy_pruned", "accuracy_finetuned", "accuracy_after"):
        if getattr(result, name) is not None:
            metrics[name] = getattr(result, name)
    result.metrics.update(metrics)
    return result


# --------------------------------------------------------------------------- inputs


def _example_input(spec: Spec, data: Dataset | None) -> torch.Tensor:
    import torch

    if spec.input is not None:
        if spec.input.dtype != "float32":
            raise SpecError(f"input.dtype must be float32 for pruning (got {spec.input.dtype})")
        low, high = spec.input.range
        g = torch.Generator().manual_seed(spec.seed)
        return torch.rand(*spec.input.shape, generator=g) * (high - low) + low
    assert data is not None  # the spec validator guarantees a dataset when input is None
    return torch.from_numpy(data.x[:1].copy())


def _check_runs(model: nn.Module, example: torch.Tensor) -> None:
    import torch

    try:
        with torch.no_grad():
            out = model.eval()(example)
    except Exception as e:  # a shape mismatch inside someone else's forward
        raise InputError(f"model: cannot run on an input of shape {list(example.shape)} ({first_line(e)})") from None
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        raise InputError("model: expected one (batch, outputs...) tensor as output; Torch-Pruning traces single-tensor models here")


def _resolve_ignored(model: nn.Module, names: list[str]) -> list[str]:
    modules = dict(model.named_modules())
    known = [n for n in modules if n]
    for name in names:
        if name not in modules or not name:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
            hint = f"close matches: {', '.join(close)}" if close else f"some layers: {', '.join(known[:8])}"
            raise SpecError(f"ignore: the model has no layer named '{name}' ({hint})")
    return list(names)


def _output_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The conv/linear layer that computes the model's output: pruning its channels would change the output shape."""
    import torch
    from torch import nn

    order: list[tuple[str, int]] = []
    handles = [
        m.register_forward_hook(lambda mod, i, o, name=name: order.append((name, o.shape[-1] if isinstance(mod, nn.Linear) else o.shape[1])))
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
    ]
    try:
        with torch.no_grad():
            out = model(example)
    finally:
        for h in handles:
            h.remove()
    width = out.shape[-1] if out.dim() == 2 else out.shape[1]
    last = [name for name, channels in order if channels == width]
    return last[-1:]


# --------------------------------------------------------------------------- structured


class _ChannelPruning:
    """Structured pruning step by step, in place.

    A channel target is one Torch-Pruning pruner built at the first step with `iterative_steps`,
    which owns the schedule (its linear scheduler: after step k of K every layer, or the model
    when global, has lost k/K of `target.ratio` of its original channels); each step scores the
    model as it is then (data-driven criteria, after the previous step's fine-tuning) and calls
    its `step()` once. A params / MACs budget has no Torch-Pruning schedule: step k's goal moves
    a linear share of the way to the budget, and a bisection on copies of the model finds the
    channel share one single-step pruner must remove to meet it.
    """

    def __init__(
        self, model: nn.Module, example: torch.Tensor, spec: Spec, ignored: list[str], calib: Dataset | None, before: tuple[int, int]
    ) -> None:
        from ..importance import CRITERIA

        self.criterion = CRITERIA[spec.importance]
        if self.criterion.needs_batchnorm and not _has_batchnorm(model):
            raise InputError(f"importance '{spec.importance}' ranks by batch-norm scales, but the model has no BatchNorm layers")
        self.model, self.example, self.spec, self.ignored, self.calib = model, example, spec, ignored, calib
        self.importance = self.criterion.make()
        self.before = before  # (MACs, params) of the unpruned model
        self.pruner: object | None = None

    def step(self, k: int) -> None:
        """Prune step k of `spec.iterative_steps`."""
        if self.criterion.needs_data:
            assert self.calib is not None
            self.criterion.prepare(self.model, _batches(self.calib, self.spec.calibration_batches), self.importance)
        t = self.spec.target
        if t.by != "channels":
            self._budget_step(k)
            return
        if self.pruner is None:
            assert t.ratio is not None
            self.pruner = _make_pruner(self.model, self.example, self.importance, t.ratio, self.spec, self.ignored, self.spec.iterative_steps)
        self.pruner.step()  # type: ignore[attr-defined]

    def _budget_step(self, k: int) -> None:
        from ..importance import copy_scores

        t, model, example = self.spec.target, self.model, self.example
        measure = 0 if t.by == "macs" else 1  # index into count_ops_and_params' (macs, params)
        start = self.before[measure]
        final = t.count if t.count is not None else round(start * (1 - (t.ratio or 0)))
        goal = start - (start - final) * k / self.spec.iterative_steps
        if _count(model, example)[measure] <= goal:
            return

        def prune(target: nn.Module, ratio: float) -> None:
            _make_pruner(target, example, self.importance, ratio, self.spec, self.ignored, steps=1).step()  # type: ignore[attr-defined]

        def trial(ratio: float) -> float:
            candidate = copy.deepcopy(model)
            copy_scores(model, candidate)
            prune(candidate, ratio)
            return _count(candidate, example)[measure]

        low, high = 0.0, self.spec.max_layer_ratio
        smallest = trial(high)
        if smallest > goal:
            raise StepFailed(
                f"target: cannot reach {t.by} <= {int(goal)} in step {k}: removing max_layer_ratio {high} of every prunable "
                f"layer still leaves {int(smallest)}; raise max_layer_ratio, add iterative_steps or ignore fewer layers"
            )
        for _ in range(_SEARCH_ITERATIONS):
            mid = (low + high) / 2
            low, high = (low, mid) if trial(mid) <= goal else (mid, high)
        prune(model, high)


def _make_pruner(model: nn.Module, example: torch.Tensor, importance: object, ratio: float, spec: Spec, ignored: list[str], steps: int) -> object:
    """A Torch-Pruning MetaPruner that removes `ratio` of the original channels over `steps` calls of its step()."""
    import torch_pruning as tp

    modules = dict(model.named_modules())
    try:
        return tp.pruner.MetaPruner(
            model,
            example,
            importance=importance,
            pruning_ratio=ratio,
            iterative_steps=steps,
            global_pruning=spec.scope == "global",
            max_pruning_ratio=spec.max_layer_ratio,
            ignored_layers=[modules[n] for n in ignored],
            round_to=spec.round_to,
        )
    except Exception as e:  # DepGraph raises many kinds for models it cannot trace
        raise InputError(f"model: Torch-Pruning cannot trace its dependencies ({first_line(e)})") from None


def _batches(data: Dataset, limit: int, size: int = 32):
    import torch

    for i in range(0, min(len(data), limit * size), size):
        y = None if data.y is None else torch.from_numpy(data.y[i : i + size])
        yield torch.from_numpy(data.x[i : i + size]), y


def _has_batchnorm(model: nn.Module) -> bool:
    from torch import nn

    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# --------------------------------------------------------------------------- unstructured


def _prunable_weights(model: nn.Module, ignored: list[str]) -> list[tuple[str, nn.Module]]:
    from torch import nn

    skip = tuple(ignored)
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and not any(name == s or name.startswith(s + ".") for s in skip)
    ]


def _unstructured_step(model: nn.Module, spec: Spec, ignored: list[str], k: int) -> None:
    """Mask the globally smallest |w| so that step k of K reaches sparsity * k / K of the prunable weights.

    Masks stay attached (torch.nn.utils.prune) during fine-tuning so zeroed weights stay zero.
    """
    import torch
    from torch.nn.utils import prune

    layers = _prunable_weights(model, ignored)
    if not layers:
        raise InputError("model: no conv or linear weights left to prune after `ignore`")
    weights = [m.weight.detach().abs().flatten() for _, m in layers]
    flat = torch.cat(weights)
    n_zero = int(round(spec.sparsity * k / spec.iterative_steps * flat.numel()))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[:n_zero]] = False
    offset = 0
    for (_, m), w in zip(layers, weights):
        mask = keep[offset : offset + w.numel()].view_as(m.weight)
        offset += w.numel()
        prune.custom_from_mask(m, "weight", mask)  # combined with an earlier step's mask


def _fold_masks(model: nn.Module) -> None:
    from torch.nn.utils import prune

    for m in model.modules():
        if prune.is_pruned(m) and hasattr(m, "weight_mask"):
            prune.remove(m, "weight")


def _sparsity(model: nn.Module) -> tuple[float, int, int]:
    from torch import nn

    zeros = total = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    return (zeros / total if total else 0.0), zeros, total


# --------------------------------------------------------------------------- recovery and output


def _finetune(model: nn.Module, train: Dataset, spec: Spec, teacher_logits: np.ndarray | None, ctx: StepContext, k: int) -> None:
    from ..stepkit import fit_config
    from ..train import fit

    f = spec.finetune
    assert f is not None
    cfg = fit_config(f, spec.seed + k, alpha=f.alpha if f.distill else 0.0)
    fit(model, train, cfg, teacher_logits=teacher_logits, progress=lambda it, desc: ctx.progress(it, f"prune step {k} {desc}"))
    model.eval()


def _count(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(MACs, params) per sample, from Torch-Pruning's counter."""
    import torch
    import torch_pruning as tp

    was_training = model.training
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model.eval(), example)
    model.train(was_training)
    return int(macs), int(params)


def _out_channels(model: nn.Module) -> dict[str, int]:
    from torch import nn

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            out[name] = m.out_features
    return out


def _write_model(
    model: nn.Module, example: torch.Tensor, verify_x: np.ndarray, export_pt2: bool, ctx: StepContext
) -> tuple[int, int, str | None]:
    """Stage model.pt (and model.pt2), check each reproduces the pruned model, then copy to outdir.

    Returns (zero weights, conv/linear weights) counted in the saved TorchScript file, and why
    model.pt2 was not written (None when it was or was not asked for).
    """
    import torch

    from ..stepkit import check_reproduces, save_verified_torchscript

    staged = ctx.scratch("pruned")
    reloaded, reference = save_verified_torchscript(model, example, verify_x, staged / "model.pt", "the saved TorchScript model")
    zeros, total = _saved_zeros(reloaded)

    pt2_error = None
    if export_pt2:
        try:
            _save_exported(model, example, staged / "model.pt2")
            with torch.no_grad():
                got2 = torch.export.load(str(staged / "model.pt2")).module()(torch.from_numpy(verify_x)).numpy()
            check_reproduces(reference, got2, "the saved torch.export model")
        except StepFailed:
            raise
        except Exception as e:  # torch.export refuses some models (data-dependent shapes, batch specialisation)
            pt2_error = first_line(e)
            log.warning("model.pt2 not written: %s", pt2_error)
            (staged / "model.pt2").unlink(missing_ok=True)
    shutil.copyfile(staged / "model.pt", ctx.outdir / "model.pt")
    if (staged / "model.pt2").exists():
        shutil.copyfile(staged / "model.pt2", ctx.outdir / "model.pt2")
    return zeros, total, pt2_error


def _save_exported(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """torch.export with a symbolic batch dimension (exported at batch 2: batch 1 would be specialised)."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model.eval(), (example.expand(2, *example.shape[1:]).contiguous(),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))


def _saved_zeros(saved: torch.jit.ScriptModule) -> tuple[int, int]:
    """Zero count over the conv/linear weight tensors (>= 2-D '*.weight') of the saved module."""
    zeros = total = 0
    for name, tensor in saved.state_dict().items():
        if name.endswith("weight") and tensor.dim() >= 2:
            zeros += int((tensor == 0).sum())
            total += tensor.numel()
    return zeros, total


register(name="prune", spec=Spec, result=Result, run=run, stage="shrink", model_input="model", hands_on=HandOff("model.pt", "torchscript"))
