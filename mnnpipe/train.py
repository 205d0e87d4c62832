"""Training and evaluation shared by distill (student training) and prune (recovery fine-tuning).

Deterministic on CPU for a given seed: torch and numpy are seeded, batches are drawn from a
seeded generator, torch runs deterministic kernels, and everything the next epoch depends on
(weights, optimizer, schedule, batch-order generator, torch's global RNG, the best weights so
far) is handed to `on_epoch_end`, so a run resumed from that state ends with the same weights as
an uninterrupted one.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import Dataset

OPTIMIZERS = ("adam", "adamw", "sgd")  # "adam" and "adamw" both mean AdamW (decoupled weight decay)
SCHEDULES = ("cosine", "constant")


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
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y) (Hinton et al. 2015).

    T^2 keeps the soft term's gradients on the same scale as the hard term's whatever T is.
    """
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
    optimizer: str = "adam"  # adam/adamw (both AdamW) | sgd (Nesterov, momentum 0.9)
    schedule: str = "cosine"  # cosine | constant
    seed: int = 0
    temperature: float = 4.0
    alpha: float = 0.0  # weight of the distillation term; 0 = plain supervised training
    patience: int | None = None  # early stopping on validation accuracy
    beta: float = 1.0  # weight of the feature-distillation term (used only with a FeatureDistiller)

    def __post_init__(self) -> None:
        # Callers that bypass a step's Spec (prune's recovery, notebooks) still get one clear line.
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got '{self.optimizer}'")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got '{self.schedule}'")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {self.patience}")


@dataclass
class FitHistory:
    train_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    best_epoch: int = -1
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FitHistory:
        return cls(
            train_loss=[float(v) for v in data.get("train_loss", [])],
            val_accuracy=[float(v) for v in data.get("val_accuracy", [])],
            best_epoch=int(data.get("best_epoch", -1)),
            stopped_early=bool(data.get("stopped_early", False)),
        )


class FeatureDistiller(nn.Module):
    """Feature distillation on named layer pairs: mean over pairs of MSE(proj(student), teacher).

    Forward hooks capture each named layer's output; a learned projection maps the student's
    feature to the teacher's shape (1x1 conv for (N, C, H, W) maps, then average pooling if the
    spatial sizes differ; linear for (N, D) vectors). The projections are this module's only
    parameters: the teacher is held outside the module tree so it is never optimised or saved.
    Both models must be plain nn.Modules (TorchScript modules do not support hooks).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, pairs: Sequence[tuple[str, str]], example: torch.Tensor):
        super().__init__()
        if not pairs:
            raise ValueError("feature distillation needs at least one (student layer, teacher layer) pair")
        for role, model in (("student", student), ("teacher", teacher)):
            if isinstance(model, torch.jit.ScriptModule):
                raise ValueError(f"{role} is a TorchScript module, which does not support forward hooks")
        self.pairs = [tuple(p) for p in pairs]
        self._teacher = [teacher]
        self._student_feats: dict[str, torch.Tensor] = {}
        self._teacher_feats: dict[str, torch.Tensor] = {}
        self._handles = []
        for role, model, names, store in (
            ("student", student, [p[0] for p in self.pairs], self._student_feats),
            ("teacher", teacher, [p[1] for p in self.pairs], self._teacher_feats),
        ):
            modules = dict(model.named_modules())
            for name in names:
                if name not in modules or name == "":
                    known = ", ".join(n for n in list(modules)[1:13])
                    raise ValueError(f"{role} has no layer named '{name}' (some of its layers: {known})")
                self._handles.append(modules[name].register_forward_hook(self._hook(store, name)))
        was_training = student.training
        with torch.no_grad():
            student.eval()
            student(example)
            teacher.eval()
            teacher(example)
        student.train(was_training)
        projections = []
        for s_name, t_name in self.pairs:
            for role, name, store in (("student", s_name, self._student_feats), ("teacher", t_name, self._teacher_feats)):
                if name not in store:  # e.g. torch.export graphs inline their layers: the hook never runs
                    raise ValueError(f"{role} layer '{name}' did not run in the model's forward, so it cannot be hooked")
            projections.append(_projection(s_name, self._student_feats[s_name].shape, t_name, self._teacher_feats[t_name].shape))
        self.projections = nn.ModuleList(projections)
        self._student_feats.clear()
        self._teacher_feats.clear()

    @staticmethod
    def _hook(store: dict[str, torch.Tensor], name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                raise ValueError(f"layer '{name}' returns {type(output).__name__}, not a tensor; pick another layer")
            # clone: a following in-place op (ReLU(inplace=True)) would otherwise overwrite it
            store[name] = output.clone()

        return hook

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Call right after the student's forward on `x`: runs the teacher and compares features."""
        with torch.no_grad():
            self._teacher[0](x)
        total = torch.zeros(())
        for proj, (s_name, t_name) in zip(self.projections, self.pairs):
            s, t = self._student_feats[s_name], self._teacher_feats[t_name]
            s = proj(s)
            if s.dim() == 4 and s.shape[-2:] != t.shape[-2:]:
                s = F.adaptive_avg_pool2d(s, t.shape[-2:])
            total = total + F.mse_loss(s, t)
        return total / len(self.pairs)

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _projection(s_name: str, s_shape: torch.Size, t_name: str, t_shape: torch.Size) -> nn.Module:
    if len(s_shape) == 4 and len(t_shape) == 4:
        return nn.Conv2d(s_shape[1], t_shape[1], kernel_size=1, bias=False)
    if len(s_shape) == 2 and len(t_shape) == 2:
        return nn.Linear(s_shape[1], t_shape[1], bias=False)
    raise ValueError(
        f"student layer '{s_name}' gives shape {list(s_shape)} and teacher layer '{t_name}' {list(t_shape)}; "
        "pair layers that are both (N, C, H, W) maps or both (N, D) vectors"
    )


def make_optimizer(params: Iterable[nn.Parameter], cfg: FitConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: FitConfig) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs))
    return torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)


def _has_batchnorm(model: nn.Module) -> bool:
    if isinstance(model, torch.jit.ScriptModule):
        return False  # traced BatchNorm runs with its recorded (eval) statistics: one sample is fine
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


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
    feature_kd: FeatureDistiller | None = None,
) -> FitHistory:
    """Train `model` in place; with `teacher_logits` (one row per training sample) it distills.

    Keeps the weights of the best validation epoch when `val` is given. `on_epoch_end(epoch,
    model, state, history)` receives everything needed to resume: pass `state` back as
    `optimizer_state`, `history` as `history` and `epoch + 1` as `start_epoch` (after loading
    the model's state_dict) and training continues exactly where it stopped.
    """
    if train.y is None:
        raise ValueError("training needs labels")
    if teacher_logits is not None and len(teacher_logits) != len(train):
        raise ValueError(f"teacher_logits has {len(teacher_logits)} rows for {len(train)} training samples")
    gen = seed_everything(cfg.seed)
    params = list(model.parameters()) + (list(feature_kd.parameters()) if feature_kd is not None else [])
    opt = make_optimizer(params, cfg)
    sched = make_scheduler(opt, cfg)
    best_state = None
    if optimizer_state:
        opt.load_state_dict(optimizer_state["optimizer"])
        sched.load_state_dict(optimizer_state["scheduler"])
        gen.set_state(optimizer_state["generator"])
        if "torch_rng" in optimizer_state:
            torch.set_rng_state(optimizer_state["torch_rng"])
        if feature_kd is not None and "feature_kd" in optimizer_state:
            feature_kd.load_state_dict(optimizer_state["feature_kd"])
        best_state = optimizer_state.get("best_state")
    history = history or FitHistory()
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    t_logits = None if teacher_logits is None else torch.from_numpy(np.asarray(teacher_logits, np.float32))
    distill = t_logits is not None and cfg.alpha > 0
    skip_singletons = _has_batchnorm(model)
    best_acc = max(history.val_accuracy) if history.val_accuracy else -1.0
    epochs = range(start_epoch, cfg.epochs) if not history.stopped_early else range(0)
    for epoch in progress(epochs, "epochs"):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(x), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            if len(idx) < 2 and skip_singletons:
                continue  # BatchNorm cannot train on a single sample
            logits = model(x[idx])
            if distill:
                loss = kd_loss(logits, t_logits[idx], y[idx], cfg.temperature, cfg.alpha)
            else:
                loss = F.cross_entropy(logits, y[idx])
            if feature_kd is not None:
                loss = loss + cfg.beta * feature_kd.loss(x[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        sched.step()
        history.train_loss.append(total / max(1, count))
        if val is not None and val.y is not None:
            acc = accuracy(model, val)
            history.val_accuracy.append(acc)
            if acc > best_acc:
                best_acc, best_state, history.best_epoch = acc, copy.deepcopy(model.state_dict()), epoch
        # Decided before the checkpoint so a resumed run knows it had already stopped.
        if cfg.patience is not None and history.best_epoch >= 0 and epoch - history.best_epoch >= cfg.patience:
            history.stopped_early = True
        if on_epoch_end is not None:
            state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "generator": gen.get_state(), "torch_rng": torch.get_rng_state()}
            if best_state is not None:
                state["best_state"] = best_state
            if feature_kd is not None:
                state["feature_kd"] = feature_kd.state_dict()
            on_epoch_end(epoch, model, state, history)
        if history.stopped_early:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return history
