"""The shared step kit: context helpers (ctx.dataset, ctx.torch_model), stepkit's helpers, the shared
sub-specs (TrainingOptions, max_accuracy_drop) and the one validation-error formatter."""

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from mnnpipe.context import StepContext
from mnnpipe.errors import InputError, StepFailed, first_line
from mnnpipe.models import digits_cnn
from mnnpipe.specs import (
    DatasetRef,
    ModelRef,
    TensorSpec,
    TrainingOptions,
    accuracy_drop_pp,
    exceeds_accuracy_budget,
    format_validation_error,
)
from mnnpipe.stepkit import fit_config, random_inputs, random_tensor, save_verified_torchscript
from mnnpipe.steps import distill, prune, quantize
from mnnpipe.train import FitConfig


@pytest.fixture
def ctx(tmp_path):
    return StepContext(workdir=tmp_path / "work", outdir=tmp_path / "out")


# --------------------------------------------------------------------------- errors.first_line


def test_first_line_is_the_first_line_cut_to_the_limit_or_the_type_name():
    assert first_line(ValueError("  shape mismatch\n  at layer 3  ")) == "shape mismatch"
    assert first_line(RuntimeError("x" * 500)) == "x" * 200
    assert first_line(RuntimeError("x" * 500), 160) == "x" * 160
    assert first_line(KeyError()) == "KeyError"
    assert first_line(RuntimeError("   \n ")) == "RuntimeError"


# --------------------------------------------------------------------------- context


def test_ctx_dataset_loads_and_refuses_unlabelled_data_naming_the_field(ctx, tmp_path):
    digits = DatasetRef(format="sklearn-digits", split="test", limit=8, preprocess={"channels": "GRAY"})
    data = ctx.dataset(digits, "evaluation", labelled="accuracy needs labels")
    assert data.x.shape == (8, 1, 8, 8) and data.y is not None
    assert ctx.dataset_path(digits) is None

    npz = tmp_path / "unlabelled.npz"
    np.savez(npz, x=np.zeros((4, 3, 2, 2), np.float32))
    ref = DatasetRef(format="npz", uri=str(npz))
    assert ctx.dataset(ref, "calibration").y is None  # labels optional unless asked for
    assert ctx.dataset_path(ref) == ctx.local(str(npz))
    with pytest.raises(InputError, match=rf"^finetune\.dataset: {npz} has no labels; fine-tuning needs labels$"):
        ctx.dataset(ref, "finetune.dataset", labelled="fine-tuning needs labels")


def test_ctx_torch_model_fetches_and_loads_in_eval_mode(ctx, tmp_path):
    torch.save(digits_cnn(width=0.25).state_dict(), tmp_path / "m.pth")
    ref = ModelRef(uri=str(tmp_path / "m.pth"), factory="mnnpipe.models:digits_cnn", factory_kwargs={"width": 0.25})
    model = ctx.torch_model(ref)
    assert isinstance(model, nn.Module) and not model.training
    assert str(tmp_path / "m.pth") in ctx.input_digests  # fetched through ctx.local: digested for the cache key


# --------------------------------------------------------------------------- random inputs


def test_random_inputs_are_seeded_and_within_each_inputs_range_and_dtype():
    inputs = [
        TensorSpec(name="pixels", shape=(1, 3, 4, 4), range=(-1, 1)),
        TensorSpec(name="ids", shape=(1, 6), dtype="int64", range=(0, 30)),
        TensorSpec(name="mask", shape=(1, 6), dtype="int64", range=(1, 1.5)),  # only the value 1
        TensorSpec(name="scale", shape=(2,), dtype="float64", range=(2, 3)),
    ]
    a, b = random_inputs(inputs, 3, seed=5), random_inputs(inputs, 3, seed=5)
    assert all(np.array_equal(x, y) for sa, sb in zip(a, b) for x, y in zip(sa, sb))
    pixels, ids, mask, scale = a[0]
    assert pixels.dtype == np.float32 and pixels.shape == (1, 3, 4, 4) and -1 <= pixels.min() and pixels.max() < 1
    assert ids.dtype == np.int64 and 0 <= ids.min() and ids.max() < 30
    assert (mask == 1).all()
    assert scale.dtype == np.float64 and 2 <= scale.min() and scale.max() < 3


def test_random_tensor_takes_another_batch():
    t = TensorSpec(shape=(1, 2, 3), dtype="uint8", range=(0, 255))
    x = random_tensor(t, np.random.default_rng(0), (4, 2, 3))
    assert x.shape == (4, 2, 3) and x.dtype == np.uint8


# --------------------------------------------------------------------------- training options


def test_finetune_and_training_share_the_training_options():
    shared = list(TrainingOptions.model_fields)
    for sub in (prune.FineTune, distill.Training):
        assert issubclass(sub, TrainingOptions)
        assert list(sub.model_fields)[: len(shared)] == shared
    assert prune.FineTune.model_fields["epochs"].default == 3 and distill.Training.model_fields["epochs"].default == 20
    with pytest.raises(ValidationError):
        prune.FineTune(dataset={"format": "sklearn-digits"}, epochs=0)


def test_fit_config_takes_every_training_field_the_loop_knows():
    t = distill.Training(epochs=4, batch_size=16, optimizer="sgd", lr=0.1, weight_decay=0.01, schedule="constant", patience=2)
    cfg = fit_config(t, 7, temperature=3.0, alpha=0.5, beta=2.0)
    assert cfg == FitConfig(
        epochs=4, batch_size=16, optimizer="sgd", lr=0.1, weight_decay=0.01, schedule="constant", patience=2, seed=7,
        temperature=3.0, alpha=0.5, beta=2.0,
    )  # fmt: skip
    f = prune.FineTune(dataset={"format": "sklearn-digits"}, temperature=2.0, alpha=0.3)
    cfg = fit_config(f, 9, alpha=0.0)  # prune: alpha only with distill on
    assert cfg == FitConfig(epochs=3, batch_size=64, optimizer="adamw", lr=1e-3, weight_decay=0.0, seed=9, temperature=2.0, alpha=0.0)


# --------------------------------------------------------------------------- accuracy budget


def test_max_accuracy_drop_is_declared_once_in_percentage_points():
    q, p = quantize.Spec.model_fields["max_accuracy_drop"], prune.Spec.model_fields["max_accuracy_drop"]
    assert q.default == 0.5 and p.default is None
    for f in (q, p):
        assert "PERCENTAGE POINTS" in f.description and [m for m in f.metadata] == [m for m in q.metadata]


def test_a_drop_at_the_budget_is_within_it():
    assert accuracy_drop_pp(0.975, 0.97) == 0.5  # 100 * 0.005000000000000004 would be beyond 0.5
    assert not exceeds_accuracy_budget(accuracy_drop_pp(0.975, 0.97), 0.5)
    assert exceeds_accuracy_budget(accuracy_drop_pp(0.975, 0.9699), 0.5)
    assert not exceeds_accuracy_budget(accuracy_drop_pp(0.9, 0.95), 0.0)  # a gain is no drop


# --------------------------------------------------------------------------- validation errors


def test_validation_errors_are_one_line_naming_the_field():
    with pytest.raises(ValidationError) as e:
        TrainingOptions(epochs=0, bogus=1)
    assert format_validation_error(e.value) == "epochs: Input should be greater than or equal to 1 (+1 more)"
    with pytest.raises(ValidationError) as e:
        prune.FineTune(bogus=1, dataset={"format": "sklearn-digits"})
    assert format_validation_error(e.value) == "bogus: unknown field (not part of this step's spec)"
    with pytest.raises(ValidationError) as e:
        prune.FineTune()
    assert format_validation_error(e.value) == "dataset: required field is missing"


# --------------------------------------------------------------------------- saved TorchScript


class _SignDependent(nn.Module):
    """Tracing records one branch: the saved file computes something else for other inputs."""

    def forward(self, x):
        return x * 2 if x.sum() > 0 else x * -3


def test_saved_torchscript_is_checked_against_the_model(tmp_path):
    model = digits_cnn(width=0.25).eval()
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    reloaded, reference = save_verified_torchscript(model, torch.from_numpy(x[:1]), x, tmp_path / "m.pt", "the saved model")
    assert isinstance(reloaded, torch.jit.ScriptModule) and reference.shape == (5, 10)

    mixed = np.concatenate([np.ones((2, 3), np.float32), -np.ones((2, 3), np.float32)])
    with pytest.raises(StepFailed, match="the traced model is outside the tolerance"):
        save_verified_torchscript(_SignDependent(), torch.ones(1, 3), mixed, tmp_path / "s.pt", "the traced model")
