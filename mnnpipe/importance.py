"""Channel-importance criteria for structured pruning, as small strategy objects over Torch-Pruning.

A `Criterion` names a Torch-Pruning importance object and, for data-driven criteria, how to
prepare the model before scoring: Taylor needs gradients of a loss, activation importance needs
per-channel activation statistics. Both are stored on the model itself (parameter `.grad`,
a buffer-like attribute on each layer), so `copy_scores` can carry them to a deep copy when the
prune step searches for the ratio that meets a parameter or MAC budget.

Torch-Pruning 1.6's own `ActivationImportance` scores the *input* of consuming layers from the
last batch only (each forward overwrites it); `MeanActivationImportance` below averages the
*output* of each prunable layer over every calibration batch instead, which is what "channels
with low mean activation go first" means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

Batches = Iterable[tuple[torch.Tensor, torch.Tensor | None]]

_fn = tp.pruner.function
_OUT_CHANNEL_HANDLERS = (
    _fn.prune_conv_out_channels,
    _fn.prune_depthwise_conv_out_channels,
    _fn.prune_linear_out_channels,
    _fn.prune_batchnorm_out_channels,
)
_STAT_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)


class MeanActivationImportance(tp.importance.GroupMagnitudeImportance):
    """Per-channel mean |output| of each conv, linear and batch-norm layer over calibration data.

    Call `collect(model, batches)` first; a group's score is the mean (over its layers) of the
    statistics of the layers whose output channels the group removes, normalised like Torch-
    Pruning's magnitude criteria so global ranking compares groups fairly.
    """

    ATTR = "_mnnpipe_mean_abs_activation"

    def __init__(self, group_reduction: str = "mean", normalizer: str = "mean"):
        super().__init__(p=1, group_reduction=group_reduction, normalizer=normalizer, target_types=list(_STAT_TYPES))

    @torch.no_grad()
    def collect(self, model: nn.Module, batches: Batches) -> int:
        """Run `model` (eval mode) over the batches; returns how many samples were seen."""
        sums: dict[nn.Module, torch.Tensor] = {}
        counts: dict[nn.Module, int] = {}

        def hook(module: nn.Module, inputs: object, output: object) -> None:
            if not isinstance(output, torch.Tensor) or output.dim() < 2:
                return
            # channels are dim 1 for conv/BN maps, the last dim for linear layers
            per_channel = output.abs().movedim(-1 if isinstance(module, nn.Linear) else 1, 0).flatten(1)
            sums[module] = sums.get(module, 0) + per_channel.sum(1).double()
            counts[module] = counts.get(module, 0) + per_channel.shape[1]

        handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _STAT_TYPES)]
        seen = 0
        was_training = model.training
        model.eval()
        try:
            for x, _ in batches:
                model(x)
                seen += len(x)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        for module, total in sums.items():
            setattr(module, self.ATTR, (total / counts[module]).float())
        return seen

    @torch.no_grad()
    def __call__(self, group: tp.dependency.Group) -> torch.Tensor | None:
        scores, root_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            layer, handler = dep.target.module, dep.handler
            stats = getattr(layer, self.ATTR, None)
            if handler not in _OUT_CHANNEL_HANDLERS or stats is None:
                continue
            scores.append(stats[idxs])
            root_idxs.append(group[i].root_idxs)
        if not scores:
            return None  # no statistics for this group: Torch-Pruning then leaves it alone
        return self._normalize(self._reduce(scores, root_idxs), self.normalizer)


def _no_preparation(model: nn.Module, batches: Batches, importance: tp.importance.Importance) -> None:
    return None


def _collect_activations(model: nn.Module, batches: Batches, importance: tp.importance.Importance) -> None:
    assert isinstance(importance, MeanActivationImportance)
    importance.collect(model, batches)


def _accumulate_gradients(model: nn.Module, batches: Batches, importance: tp.importance.Importance) -> None:
    """Sum d(loss)/d(weight) over the batches; unlabelled batches use the model's own argmax.

    Eval mode: gradients flow the same, and batch-norm running statistics are not disturbed.
    """
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    try:
        for x, y in batches:
            logits = model(x)
            target = y if y is not None else logits.detach().argmax(1)
            F.cross_entropy(logits, target, reduction="sum").backward()
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class Criterion:
    """One way to rank channels: the Torch-Pruning importance, and how to prepare the model for it."""

    name: str
    description: str
    make: Callable[[], tp.importance.Importance]
    prepare: Callable[[nn.Module, Batches, tp.importance.Importance], None] = _no_preparation
    needs_data: bool = False
    needs_batchnorm: bool = False


CRITERIA: dict[str, Criterion] = {
    c.name: c
    for c in (
        Criterion("l1", "L1 norm of each channel's weights, summed over the dependency group",
                  lambda: tp.importance.GroupMagnitudeImportance(p=1)),
        Criterion("l2", "L2 norm of each channel's weights, summed over the dependency group",
                  lambda: tp.importance.GroupMagnitudeImportance(p=2)),
        Criterion("bn-scale", "|gamma| of the batch-norm layers in the group (network slimming)",
                  tp.importance.BNScaleImportance, needs_batchnorm=True),
        Criterion("taylor", "|weight x gradient| of the cross-entropy loss on calibration data (Molchanov et al. 2019)",
                  tp.importance.GroupTaylorImportance, _accumulate_gradients, needs_data=True),
        Criterion("activation", "mean |output| of each channel over calibration data",
                  MeanActivationImportance, _collect_activations, needs_data=True),
    )
}  # fmt: skip


def copy_scores(src: nn.Module, dst: nn.Module) -> None:
    """Carry gradients (deepcopy drops them) to a deep copy; activation statistics travel as attributes."""
    for (name, p_src), (_, p_dst) in zip(src.named_parameters(), dst.named_parameters(), strict=True):
        p_dst.grad = None if p_src.grad is None else p_src.grad.clone()
