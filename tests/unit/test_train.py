"""The shared training loop: the KD loss, determinism, resume, early stopping, feature distillation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mnnpipe.data import load_dataset
from mnnpipe.models import digits_cnn
from mnnpipe.specs import DatasetRef
from mnnpipe.train import FeatureDistiller, FitConfig, FitHistory, accuracy, fit, kd_loss, topk_accuracy

DIGITS = DatasetRef(format="sklearn-digits", preprocess={"channels": "GRAY"})


@pytest.fixture(scope="module")
def train_set():
    return load_dataset(DIGITS.model_copy(update={"split": "train", "limit": 240}))


@pytest.fixture(scope="module")
def val_set():
    return load_dataset(DIGITS.model_copy(update={"split": "val", "limit": 60}))


def fresh_model(seed: int = 0, width: float = 0.25):
    torch.manual_seed(seed)
    return digits_cnn(width=width)


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- kd_loss


def test_kd_loss_with_alpha_zero_is_cross_entropy():
    g = torch.Generator().manual_seed(0)
    s, t, y = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g), torch.arange(8) % 10

    loss = kd_loss(s, t, y, temperature=3.0, alpha=0.0)

    assert torch.allclose(loss, F.cross_entropy(s, y))


def test_kd_loss_soft_term_is_t_squared_kl_and_zero_for_identical_logits():
    g = torch.Generator().manual_seed(1)
    s, t, y = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g), torch.zeros(4, dtype=torch.long)
    T = 2.5
    p_t, log_p_s = F.softmax(t / T, 1), F.log_softmax(s / T, 1)
    expected = T**2 * (p_t * (p_t.log() - log_p_s)).sum(1).mean()

    loss = kd_loss(s, t, y, temperature=T, alpha=1.0)

    assert torch.allclose(loss, expected, atol=1e-6)
    assert float(kd_loss(t, t, y, temperature=T, alpha=1.0)) == pytest.approx(0.0, abs=1e-6)


def test_topk_accuracy_counts_label_within_top_k():
    logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05]])
    y = np.array([1, 1])

    assert topk_accuracy(logits, y, 1) == 0.5
    assert topk_accuracy(logits, y, 2) == 1.0


# --------------------------------------------------------------------------- fit


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"alpha": 1.5}, "alpha"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"schedule": "linear"}, "schedule"),
        ({"patience": 0}, "patience"),
    ],
)
def test_fit_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FitConfig(**kwargs)


def test_same_seed_gives_identical_weights_and_another_seed_does_not(train_set):
    cfg = FitConfig(epochs=2, batch_size=32, seed=7)
    a, b, c = fresh_model(7), fresh_model(7), fresh_model(7)

    fit(a, train_set, cfg)
    fit(b, train_set, cfg)
    fit(c, train_set, FitConfig(epochs=2, batch_size=32, seed=8))

    assert same_weights(weights(a), weights(b))
    assert not same_weights(weights(a), weights(c))


def test_resuming_from_epoch_end_state_matches_an_uninterrupted_run(train_set, val_set):
    cfg = FitConfig(epochs=4, batch_size=32, seed=3, lr=3e-3)
    teacher_logits = np.random.default_rng(0).normal(size=(len(train_set), 10)).astype(np.float32)
    cfg_kd = FitConfig(**{**cfg.__dict__, "alpha": 0.5})
    uninterrupted = fresh_model(3)
    fit(uninterrupted, train_set, cfg_kd, val=val_set, teacher_logits=teacher_logits)
    saved = {}

    class Crash(Exception):
        pass

    def checkpoint(epoch, model, state, history):
        saved.update(epoch=epoch, model=weights(model), state=state, history=FitHistory.from_dict(history.to_dict()))
        if epoch == 1:
            raise Crash

    first = fresh_model(3)
    with pytest.raises(Crash):
        fit(first, train_set, cfg_kd, val=val_set, teacher_logits=teacher_logits, on_epoch_end=checkpoint)
    resumed = fresh_model(99)  # different init: everything must come from the saved state
    resumed.load_state_dict(saved["model"])
    history = fit(
        resumed, train_set, cfg_kd, val=val_set, teacher_logits=teacher_logits,
        start_epoch=saved["epoch"] + 1, optimizer_state=saved["state"], history=saved["history"],
    )  # fmt: skip

    assert len(history.train_loss) == 4
    assert same_weights(weights(resumed), weights(uninterrupted))


def test_early_stopping_stops_after_patience_and_keeps_best_weights(train_set, val_set):
    model = fresh_model(0)
    best = {}

    def remember(epoch, m, state, history):
        if epoch == history.best_epoch:
            best["w"] = weights(m)

    history = fit(model, train_set, FitConfig(epochs=30, lr=0.5, optimizer="sgd", schedule="constant", patience=2), val=val_set, on_epoch_end=remember)

    assert history.stopped_early
    assert len(history.train_loss) == history.best_epoch + 3
    assert same_weights(weights(model), best["w"])
    assert accuracy(model, val_set) == pytest.approx(max(history.val_accuracy))


def test_resume_after_early_stop_trains_no_further(train_set):
    model = fresh_model(0)
    history = FitHistory(train_loss=[1.0], val_accuracy=[0.5], best_epoch=0, stopped_early=True)
    before = weights(model)

    out = fit(model, train_set, FitConfig(epochs=5), start_epoch=1, history=history)

    assert out.train_loss == [1.0]
    assert same_weights(weights(model), before)


def test_teacher_logits_must_match_training_samples(train_set):
    with pytest.raises(ValueError, match="rows for"):
        fit(fresh_model(), train_set, FitConfig(epochs=1, alpha=0.5), teacher_logits=np.zeros((3, 10), np.float32))


# --------------------------------------------------------------------------- feature distillation


def test_feature_distiller_projects_student_features_to_teacher_shapes(train_set):
    student, teacher = fresh_model(0, width=0.25), fresh_model(1, width=1.0)
    x = torch.from_numpy(train_set.x[:4])

    kd = FeatureDistiller(student, teacher, [("features.3", "features.3"), ("classifier.2", "classifier.2")], x)
    student.train()
    student(x)
    loss = kd.loss(x)
    loss.backward()

    conv, linear = kd.projections
    assert (conv.in_channels, conv.out_channels) == (16, 64)
    assert (linear.in_features, linear.out_features) == (32, 128)
    assert float(loss.detach()) > 0
    assert conv.weight.grad is not None and student.features[3].weight.grad is not None
    assert not any(p.grad is not None for p in teacher.parameters())
    assert len(list(kd.parameters())) == 2  # teacher weights are not part of the distiller


def test_feature_distillation_trains_student_and_projections(train_set):
    student, teacher = fresh_model(0), fresh_model(1, width=1.0)
    kd = FeatureDistiller(student, teacher, [("features.3", "features.3")], torch.from_numpy(train_set.x[:2]))
    proj_before = kd.projections[0].weight.clone()

    history = fit(student, train_set, FitConfig(epochs=1, beta=2.0), feature_kd=kd)

    assert np.isfinite(history.train_loss).all()
    assert not torch.equal(kd.projections[0].weight, proj_before)


@pytest.mark.parametrize(
    "pairs, message",
    [
        ([("features.99", "features.3")], "student has no layer named 'features.99'"),
        ([("features.3", "nope")], "teacher has no layer named 'nope'"),
        ([("features.3", "classifier.2")], "both"),
    ],
)
def test_feature_distiller_rejects_unusable_layers(train_set, pairs, message):
    with pytest.raises(ValueError, match=message):
        FeatureDistiller(fresh_model(0), fresh_model(1), pairs, torch.from_numpy(train_set.x[:2]))


def test_feature_distiller_rejects_torchscript_models(train_set):
    x = torch.from_numpy(train_set.x[:2])
    scripted = torch.jit.trace(fresh_model(1).eval(), (x,))

    with pytest.raises(ValueError, match="teacher is a TorchScript module"):
        FeatureDistiller(fresh_model(0), scripted, [("features.3", "features.3")], x)
