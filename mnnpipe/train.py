"""Training and evaluation shared by distill (student training) and prune (recovery fine-tuning).

Deterministic on CPU for a given seed: torch and numpy are seeded, batches are drawn from a
seeded generator, and torch runs deterministic kernels.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import Dataset


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits for every sample, in batches, eval mode."""
    model.eval()
    outs = [model(torch.from_numpy(x[i : i + batch_size])).float().numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


def topk_accuracy(logits: np.ndarray, y: np.ndarray, k: int = 1) -> float:
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1)[:, :k]
    return float((top == y[:, None]).any(axis=1).mean())


def accuracy(model: nn.Module, data: Dataset) -> float:
    if data.y is None:
        raise ValueError("accuracy needs a labelled dataset")
    return topk_accuracy(predict(model, data.x), data.y, 1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float, alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y) (Hinton et al. 2015)."""
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    hard = F.cross_entropy(student_logits, labels)
    return alpha * temperature**2 * soft + (1 - alpha) * hard


@dataclass
class FitConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"  # adam | sgd
    schedule: str = "cosine"  # cosine | constant
    seed: int = 0
    temperature: float = 4.0
    alpha: float = 0.0  # weight of the distillation term; 0 = plain supervised training
    patience: int | None = None  # early stopping on validation accuracy


@dataclass
class FitHistory:
    train_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    best_epoch: int = -1
    stopped_early: bool = False


def make_optimizer(model: nn.Module, cfg: FitConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: FitConfig) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs))
    return torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)


def fit(
    model: nn.Module,
    train: Dataset,
    cfg: FitConfig,
    *,
    val: Dataset | None = None,
    teacher_logits: np.ndarray | None = None,
    progress: Callable[[Iterable[int], str], Iterable[int]] = lambda it, desc: it,
    on_epoch_end: Callable[[int, nn.Module, dict, FitHistory], None] | None = None,
    start_epoch: int = 0,
    optimizer_state: dict | None = None,
    history: FitHistory | None = None,
) -> FitHistory:
    """Train `model` in place; with `teacher_logits` (one row per training sample) it distills.

    Keeps the weights of the best validation epoch when `val` is given.
    """
    if train.y is None:
        raise ValueError("training needs labels")
    gen = seed_everything(cfg.seed)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg)
    if optimizer_state:
        opt.load_state_dict(optimizer_state["optimizer"])
        sched.load_state_dict(optimizer_state["scheduler"])
        gen.set_state(optimizer_state["generator"])
    history = history or FitHistory()
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    t_logits = None if teacher_logits is None else torch.from_numpy(teacher_logits)
    best_acc, best_state = (max(history.val_accuracy) if history.val_accuracy else -1.0), None
    for epoch in progress(range(start_epoch, cfg.epochs), "epochs"):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(x), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            if len(idx) < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
                continue  # BatchNorm cannot train on a single sample
            logits = model(x[idx])
            if t_logits is not None and cfg.alpha > 0:
                loss = kd_loss(logits, t_logits[idx], y[idx], cfg.temperature, cfg.alpha)
            else:
                loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss) * len(idx)
            count += len(idx)
        sched.step()
        history.train_loss.append(total / max(1, count))
        if val is not None and val.y is not None:
            acc = accuracy(model, val)
            history.val_accuracy.append(acc)
            if acc > best_acc:
                best_acc, best_state, history.best_epoch = acc, copy.deepcopy(model.state_dict()), epoch
        if on_epoch_end is not None:  # e.g. a checkpoint that `optimizer_state` can resume from
            on_epoch_end(epoch, model, {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "generator": gen.get_state()}, history)
        if cfg.patience is not None and history.best_epoch >= 0 and epoch - history.best_epoch >= cfg.patience:
            history.stopped_early = True
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return history
