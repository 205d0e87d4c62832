"""distill: train a small student to imitate a teacher (knowledge distillation, Hinton et al. 2015).

loss = alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, y)
       + beta * mean MSE(projection(student layer), teacher layer)   (optional feature pairs)

The student is a reference architecture at a width multiplier, a factory, or an existing model
(e.g. a pruned TorchScript model, fine-tuned here to recover accuracy). Training checkpoints to
`{output}/checkpoints/` after every epoch and resumes from there after a crash; teacher logits
are cached by content so several students of one teacher compute them once.

Finding (torch 2.13): a loaded *traced* TorchScript module is trainable (parameters require
grad, `.train()` works, gradients flow), but its BatchNorm/Dropout keep the behaviour they were
traced with (eval: running statistics are used and never updated), and it supports no forward
hooks. So a TorchScript student is fine-tuned with frozen normalisation statistics, and feature
distillation needs both models as plain nn.Modules (state-dict + factory). torch.export
programs refuse `.train()`, so they cannot be students.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import time
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from ..catalog import HandOff, register
from ..errors import InputError, StepFailed, first_line
from ..specs import DatasetRef, ModelRef, StepResult, StepSpec, Strict, TrainingOptions, check_factory

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from ..data import Dataset
    from ..context import StepContext

log = logging.getLogger("mnnpipe.distill")

# Kept literal (not imported from mnnpipe.models) so that reading the schema never imports torch;
# a unit test checks it equals mnnpipe.models.ARCHITECTURES.
Architecture = Literal["digits_cnn", "mobilenet_v2", "resnet18"]
CHECKPOINT_FORMAT = "mnnpipe-distill-checkpoint/1"
_CHECKPOINT_RE = re.compile(r"^epoch-(\d+)\.pt$")


class Student(Strict):
    """What to train: exactly one of `architecture`, `factory` or `model`."""

    architecture: Architecture | None = Field(
        None,
        description="A reference architecture from mnnpipe.models, built at `width` with the dataset's class "
        "count and channel count (override with factory_kwargs).",
    )
    width: float = Field(1.0, gt=0, le=4, description="Width multiplier for `architecture` (e.g. 0.5: half the channels).")
    factory: str | None = Field(
        None, description="`pkg.module:callable` returning a fresh nn.Module. Imported code: name only modules you trust."
    )
    factory_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for `factory`, or extra ones for `architecture`."
    )
    model: ModelRef | None = Field(
        None,
        description="An existing model to fine-tune, e.g. a pruned TorchScript (.pt) model or a state-dict with its "
        "factory. TorchScript students train with their traced (eval) BatchNorm statistics.",
    )

    @field_validator("factory")
    @classmethod
    def _factory(cls, v: str | None) -> str | None:
        return check_factory(v)

    @field_validator("model")
    @classmethod
    def _trainable_format(cls, v: ModelRef | None) -> ModelRef | None:
        if v is not None and v.format not in ("torchscript", "state-dict"):
            raise ValueError(
                f"format '{v.format}' cannot be trained; give a TorchScript (.pt) model or a state-dict (.pth) with its factory"
            )
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> Student:
        given = [name for name in ("architecture", "factory", "model") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of architecture, factory or model (got {', '.join(given) or 'none'})")
        if self.width != 1.0 and self.architecture is None:
            raise ValueError("width applies only to `architecture`; pass a width to a factory in factory_kwargs")
        if self.model is not None and self.factory_kwargs:
            raise ValueError("factory_kwargs does not apply to `model`; use model.factory_kwargs")
        return self


class FeaturePair(Strict):
    """One feature-distillation pair: a student layer trained to predict a teacher layer's output."""

    student: str = Field(min_length=1, max_length=256, description="Student layer name as in named_modules(), e.g. 'features.3'.")
    teacher: str = Field(min_length=1, max_length=256, description="Teacher layer name as in named_modules(), e.g. 'features.3'.")


class Training(TrainingOptions):
    """Optimisation settings, shared by the distilled student and the no-teacher baseline."""

    schedule: Literal["cosine", "constant"] = Field("cosine", description="Learning-rate schedule over `epochs`.")
    patience: int | None = Field(
        None, ge=1, description="Stop when validation accuracy has not improved for this many epochs; None trains all epochs."
    )


class Spec(StepSpec):
    """Distil a teacher into a student on a labelled dataset."""

    kind: Literal["distill"] = "distill"
    teacher: ModelRef = Field(description="The trained teacher: TorchScript, torch-export or state-dict (+ factory).")
    student: Student = Field(description="The student to train.")
    dataset: DatasetRef = Field(
        description="Labelled data with split 'all': the step trains on its deterministic train split, early-stops "
        "on val and reports every accuracy on test."
    )
    temperature: float = Field(4.0, description="Softmax temperature T (> 0) for the distillation term.")
    alpha: float = Field(0.9, description="Weight in [0, 1] of the distillation term; 1 - alpha weighs cross-entropy on labels.")
    features: list[FeaturePair] = Field(
        default_factory=list,
        description="Optional feature-distillation pairs (student layer, teacher layer), each through a learned "
        "1x1-conv or linear projection. Needs both models as nn.Modules (state-dict or factory), not TorchScript.",
    )
    beta: float = Field(1.0, ge=0, le=1000, description="Weight of the feature-distillation term.")
    training: Training = Field(default_factory=Training, description="Optimiser, schedule, epochs, batch size, early stopping.")
    baseline: bool = Field(
        False, description="Also train the same student without the teacher (alpha=0, same seed) and report its accuracy."
    )
    cache_teacher_logits: bool = Field(
        True, description="Reuse teacher logits computed earlier for the same teacher bytes and the same input tensors."
    )
    min_accuracy_ratio: float | None = Field(
        None, gt=0, le=2, description="Fail (publish nothing) if student accuracy / teacher accuracy is below this."
    )

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"temperature must be > 0 (it divides the logits), got {v}")
        return v

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v: float) -> float:
        if not 0 <= v <= 1:
            raise ValueError(f"alpha must be in [0, 1] (weight of the distillation term), got {v}")
        return v

    @field_validator("teacher")
    @classmethod
    def _teacher(cls, v: ModelRef) -> ModelRef:
        if not v.is_torch:
            raise ValueError(f"format '{v.format}' cannot be run in torch; give a TorchScript, torch-export or state-dict teacher")
        return v

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: DatasetRef) -> DatasetRef:
        if v.split != "all":
            raise ValueError(f"split must be 'all' (the step uses its train/val/test splits itself), got '{v.split}'")
        return v

    @field_validator("features")
    @classmethod
    def _features(cls, v: list[FeaturePair], info: ValidationInfo) -> list[FeaturePair]:
        if not v:
            return v
        teacher, student = info.data.get("teacher"), info.data.get("student")
        if teacher is not None and teacher.format != "state-dict":
            raise ValueError(
                f"feature distillation hooks teacher layers, which a {teacher.format} teacher does not support; "
                "give the teacher as a state-dict with its factory"
            )
        if student is not None and student.model is not None and student.model.format != "state-dict":
            raise ValueError(
                f"feature distillation hooks student layers, which a {student.model.format} student does not support; "
                "give the student as architecture, factory or a state-dict"
            )
        return v


class Result(StepResult):
    kind: Literal["distill"] = "distill"
    teacher_accuracy: float = Field(description="Teacher top-1 accuracy on the test split.")
    student_accuracy: float = Field(description="Distilled student top-1 accuracy on the test split.")
    baseline_accuracy: float | None = Field(None, description="Same student trained without the teacher (when baseline: true).")
    accuracy_gain: float | None = Field(None, description="student_accuracy - baseline_accuracy: what distillation added.")
    accuracy_ratio: float = Field(description="student_accuracy / teacher_accuracy.")
    teacher_params: int = Field(description="Number of teacher parameters.")
    student_params: int = Field(description="Number of student parameters.")
    params_ratio: float = Field(description="student_params / teacher_params.")
    test_samples: int = Field(description="Labelled samples the accuracies were measured on.")
    epochs_run: int = Field(description="Epochs the student trained (fewer than configured after early stopping).")
    best_epoch: int = Field(description="Epoch (0-based) whose weights were kept; -1 without validation data.")
    stopped_early: bool = Field(description="True when early stopping ended training.")
    resumed_from_epoch: int | None = Field(None, description="Completed epochs restored from a checkpoint; None for a fresh run.")
    teacher_logits_cached: bool = Field(description="True when the teacher's training logits came from the cache.")
    student_factory: str | None = Field(None, description="Factory that rebuilds the student for student.pth (None for TorchScript students).")
    student_factory_kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for student_factory.")


DistillSpec, DistillResult = Spec, Result


# --------------------------------------------------------------------------- the step


def run(spec: Spec, ctx: StepContext) -> Result:
    import torch

    from ..models import count_params
    from ..stepkit import fit_config
    from ..train import FeatureDistiller, FitHistory, accuracy, fit, seed_everything, topk_accuracy

    train_set, val_set, test_set = _load_splits(spec.dataset, ctx)
    teacher = ctx.torch_model(spec.teacher)
    _set_requires_grad(teacher, False)
    num_classes = train_set.num_classes
    _check_outputs("teacher", teacher, train_set.x[:2], num_classes)

    train_logits, train_hit = _teacher_logits(spec, ctx, teacher, train_set.x)
    test_logits, _ = _teacher_logits(spec, ctx, teacher, test_set.x)
    teacher_acc = topk_accuracy(test_logits, test_set.y, 1)

    cfg = fit_config(spec.training, spec.seed, temperature=spec.temperature, alpha=spec.alpha, beta=spec.beta)
    progress = lambda it, desc: ctx.progress(it, f"distill {desc}")  # noqa: E731

    seed_everything(spec.seed)  # the student's initial weights depend only on the seed
    student, factory, factory_kwargs = _build_student(spec.student, ctx, train_set, num_classes)
    feature_kd = None
    if spec.features:
        try:
            feature_kd = FeatureDistiller(
                student, teacher, [(p.student, p.teacher) for p in spec.features], torch.from_numpy(train_set.x[:2])
            )
        except ValueError as e:
            raise InputError(f"features: {e}") from None

    start_epoch, resume_state, history = 0, None, None
    checkpoint = _latest_checkpoint(ctx)
    if checkpoint is not None:
        student.load_state_dict(checkpoint["model"])
        start_epoch, resume_state = checkpoint["epoch"], checkpoint["state"]
        history = FitHistory.from_dict(checkpoint["history"])
        log.info("resuming distillation from checkpoint epoch-%d", start_epoch)

    def save_checkpoint(epoch: int, model: nn.Module, state: dict, hist: Any) -> None:
        _store_checkpoint(ctx, epoch + 1, model, state, hist)

    t0 = time.perf_counter()
    history = fit(
        student, train_set, cfg, val=val_set, teacher_logits=train_logits, progress=progress,
        on_epoch_end=save_checkpoint, start_epoch=start_epoch, optimizer_state=resume_state, history=history,
        feature_kd=feature_kd,
    )  # fmt: skip
    train_seconds = time.perf_counter() - t0
    if feature_kd is not None:
        feature_kd.remove_hooks()
    student.eval()
    student_acc = accuracy(student, test_set)

    baseline_acc = None
    baseline_history = None
    if spec.baseline:
        seed_everything(spec.seed)
        plain, _, _ = _build_student(spec.student, ctx, train_set, num_classes)
        plain_cfg = dataclasses.replace(cfg, alpha=0.0)
        baseline_history = fit(plain, train_set, plain_cfg, val=val_set, progress=lambda it, d: ctx.progress(it, f"baseline {d}"))
        baseline_acc = accuracy(plain, test_set)

    teacher_params, student_params = count_params(teacher), count_params(student)
    ratio = student_acc / teacher_acc if teacher_acc > 0 else 0.0
    if spec.min_accuracy_ratio is not None and ratio < spec.min_accuracy_ratio:
        raise StepFailed(
            f"student accuracy {student_acc:.4f} is {ratio:.3f} of the teacher's {teacher_acc:.4f}, "
            f"below min_accuracy_ratio {spec.min_accuracy_ratio}"
        )

    _write_student(student, factory, factory_kwargs, test_set, ctx)
    (ctx.outdir / "history.json").write_text(
        json.dumps(
            {"student": history.to_dict(), "baseline": baseline_history.to_dict() if baseline_history else None}, indent=2
        )
    )
    result = Result(
        output=spec.output,
        teacher_accuracy=teacher_acc,
        student_accuracy=student_acc,
        baseline_accuracy=baseline_acc,
        accuracy_gain=None if baseline_acc is None else student_acc - baseline_acc,
        accuracy_ratio=ratio,
        teacher_params=teacher_params,
        student_params=student_params,
        params_ratio=student_params / teacher_params if teacher_params else 0.0,
        test_samples=len(test_set),
        epochs_run=len(history.train_loss),
        best_epoch=history.best_epoch,
        stopped_early=history.stopped_early,
        resumed_from_epoch=start_epoch if checkpoint is not None else None,
        teacher_logits_cached=train_hit,
        student_factory=factory,
        student_factory_kwargs=factory_kwargs,
    )
    metrics = {
        "teacher_accuracy": teacher_acc,
        "student_accuracy": student_acc,
        "accuracy_ratio": ratio,
        "teacher_params": float(teacher_params),
        "student_params": float(student_params),
        "params_ratio": result.params_ratio,
        "epochs_run": float(result.epochs_run),
        "train_seconds": round(train_seconds, 3),
    }
    if baseline_acc is not None:
        metrics.update(baseline_accuracy=baseline_acc, accuracy_gain=result.accuracy_gain)
    result.metrics.update(metrics)
    return result


# --------------------------------------------------------------------------- helpers


def _load_splits(ref: DatasetRef, ctx: StepContext) -> tuple[Dataset, Dataset, Dataset]:
    labelled = "distillation needs labelled data"
    splits = tuple(ctx.dataset(ref.model_copy(update={"split": s}), "dataset", labelled=labelled) for s in ("train", "val", "test"))
    if splits[0].x.ndim < 2:
        raise InputError(f"dataset: samples have shape {list(splits[0].x.shape[1:])}; expected tensors")
    return splits  # type: ignore[return-value]


def _check_outputs(role: str, model: nn.Module, x: np.ndarray, num_classes: int) -> None:
    """The model must run on the dataset's tensors and produce one logit per dataset class."""
    import torch

    try:
        with torch.no_grad():
            out = model.eval()(torch.from_numpy(x))
    except Exception as e:  # shape or dtype mismatch inside someone else's forward
        raise InputError(f"{role}: cannot run on dataset inputs of shape {list(x.shape[1:])} ({first_line(e)})") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(f"{role}: expected (batch, classes) logits, got {shape}")
    if out.shape[1] != num_classes:
        raise InputError(f"{role}: model outputs {out.shape[1]} classes but the dataset has {num_classes}")


def _build_student(s: Student, ctx: StepContext, train: Dataset, num_classes: int) -> tuple[nn.Module, str | None, dict[str, Any]]:
    import torch

    from ..modelio import build

    if s.architecture is not None:
        factory = f"mnnpipe.models:{s.architecture}"
        kwargs = {"num_classes": num_classes, "in_channels": int(train.x.shape[1]), **s.factory_kwargs, "width": s.width}
        model = build(factory, kwargs)
    elif s.factory is not None:
        factory, kwargs = s.factory, dict(s.factory_kwargs)
        model = build(factory, kwargs)
    else:
        assert s.model is not None
        model = ctx.torch_model(s.model)
        factory = s.model.factory if s.model.format == "state-dict" else None
        kwargs = dict(s.model.factory_kwargs) if factory else {}
        _set_requires_grad(model, True)
    if not any(p.requires_grad for p in model.parameters()):
        raise InputError("student: the model has no trainable parameters")
    _check_outputs("student", model, train.x[:2], num_classes)
    if not isinstance(model, torch.jit.ScriptModule):
        model.train()
    return model, factory, kwargs


def _set_requires_grad(model: nn.Module, flag: bool) -> None:
    for p in model.parameters():  # Module.requires_grad_ refuses ScriptModules; their parameters accept it
        p.requires_grad_(flag)


def teacher_logits_key(spec: Spec, ctx: StepContext, x: np.ndarray) -> str:
    """Content key: the teacher's bytes and how they are read, and the exact input tensor.

    Hashing the preprocessed tensor (not the dataset reference) covers the data, the split,
    the limit and every preprocessing option at once; it costs far less than the teacher's forward.
    """
    t = spec.teacher
    body = {
        "teacher": ctx.input_digests[t.uri],
        "format": t.format,
        "factory": t.factory,
        "factory_kwargs": t.factory_kwargs,
        "x_sha256": hashlib.sha256(x.tobytes()).hexdigest(),
        "x_shape": list(x.shape),
        "x_dtype": str(x.dtype),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _teacher_logits(spec: Spec, ctx: StepContext, teacher: nn.Module, x: np.ndarray) -> tuple[np.ndarray, bool]:
    """The teacher's logits for `x`, from the cache when an earlier run computed them. (logits, hit)."""
    import numpy as np

    from ..train import predict

    if not spec.cache_teacher_logits:
        return predict(teacher, x), False
    key = teacher_logits_key(spec, ctx, x)
    cache = ctx.shared_cache("teacher-logits")
    local = cache.get(f"{key}.npz")
    if local is not None:
        try:
            with np.load(local, allow_pickle=False) as f:
                logits = f["logits"]
            if logits.dtype == np.float32 and logits.ndim == 2 and len(logits) == len(x) and np.isfinite(logits).all():
                return logits, True
            log.warning("teacher-logits cache entry %s has the wrong shape or values; recomputing", key[:12])
        except (ValueError, OSError, KeyError) as e:
            log.warning("teacher-logits cache entry %s is unreadable (%s); recomputing", key[:12], type(e).__name__)
    logits = predict(teacher, x).astype(np.float32)
    local = ctx.scratch("teacher-logits") / f"{key}.npz"
    np.savez(local, logits=logits)
    cache.put(local, f"{key}.npz")
    return logits, False


def _store_checkpoint(ctx: StepContext, completed: int, model: nn.Module, state: dict, history: Any) -> None:
    """Write epoch-N.pt (state dicts only) among the step's checkpoints, then drop older ones.
    The runner deletes them all once the output is published."""
    import torch

    local = ctx.scratch("checkpoint-out") / f"epoch-{completed}.pt"
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "spec_digest": ctx.key,
            "epoch": completed,
            "model": model.state_dict(),
            "state": state,
            "history": history.to_dict(),
        },
        local,
    )
    ctx.checkpoints.save(local)
    local.unlink()
    # One checkpoint is enough to resume; keeping one per epoch would grow the store with the model.
    for name in _checkpoint_names(ctx):
        if _checkpoint_epoch(name) < completed:
            ctx.checkpoints.delete(name)


def _checkpoint_names(ctx: StepContext) -> list[str]:
    return [n for n in ctx.checkpoints.names() if _checkpoint_epoch(n) is not None]


def _checkpoint_epoch(name: str) -> int | None:
    m = _CHECKPOINT_RE.match(name)
    return int(m.group(1)) if m else None


def _latest_checkpoint(ctx: StepContext) -> dict | None:
    """The newest readable checkpoint written by this same work (spec, inputs, engines), or None."""
    import torch

    for name in sorted(_checkpoint_names(ctx), key=_checkpoint_epoch, reverse=True):
        local = ctx.checkpoints.fetch(name)
        if local is None:
            continue  # deleted between list and get
        try:
            data = torch.load(local, map_location="cpu", weights_only=True)
        except Exception as e:  # a torn or foreign file is not a reason to fail the run
            log.warning("ignoring unreadable checkpoint %s (%s)", name, type(e).__name__)
            continue
        if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
            continue
        if data.get("spec_digest") != ctx.key:
            log.info("checkpoint %s belongs to another spec or inputs; starting fresh", name)
            continue
        return data
    return None


def _write_student(student: nn.Module, factory: str | None, factory_kwargs: dict[str, Any], test: Dataset, ctx: StepContext) -> None:
    """model.pt (TorchScript) and, when a factory rebuilds it, student.pth; verified before outdir."""
    import shutil

    import torch

    from ..stepkit import save_verified_torchscript

    staged = ctx.scratch("student") / "model.pt"
    save_verified_torchscript(student, torch.from_numpy(test.x[:1]), test.x, staged, "the saved TorchScript student")
    shutil.copyfile(staged, ctx.outdir / "model.pt")
    if factory is not None:
        torch.save(
            {"state_dict": student.state_dict(), "factory": factory, "factory_kwargs": factory_kwargs},
            ctx.outdir / "student.pth",
        )


register(name="distill", spec=Spec, result=Result, run=run, stage="train", model_input="teacher", hands_on=HandOff("model.pt", "torchscript"))
