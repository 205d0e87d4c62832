"""The distill step end to end on scikit-learn's digits: accuracy floor, artifacts other steps can
load, the teacher-logits cache, determinism, crash and resume, TorchScript and feature KD, bad input."""

import json
import os

import numpy as np
import pytest
import torch

from mnnpipe.data import load_dataset
from mnnpipe.errors import InputError, StepFailed
from mnnpipe.modelio import load_torch, save_torchscript
from mnnpipe.models import digits_cnn
from mnnpipe.runner import run_step
from mnnpipe.specs import DatasetRef, ModelRef
from mnnpipe.steps import distill
from mnnpipe.train import FitConfig, accuracy, fit

pytestmark = pytest.mark.integration

DIGITS = {"format": "sklearn-digits", "preprocess": {"channels": "GRAY"}}
STUDENT_WIDTH = 0.45  # 29.9k params: 19.8% of the width-1.0 teacher's 151k


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train faster on one thread, and a busy 2-core CI box does not make it crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def split(name):
    return load_dataset(DatasetRef(**DIGITS, split=name))


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    """A digits_cnn teacher (width 1.0) trained for a few epochs, saved as a state-dict."""
    torch.manual_seed(0)
    model = digits_cnn(width=1.0)
    fit(model, split("train"), FitConfig(epochs=5, seed=0, lr=2e-3), val=split("val"))
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save(model.state_dict(), path)
    return path


def spec(teacher_path, output, **overrides):
    data = {
        "output": str(output),
        "teacher": {"uri": str(teacher_path), "factory": "mnnpipe.models:digits_cnn"},
        "student": {"architecture": "digits_cnn", "width": STUDENT_WIDTH},
        "dataset": DIGITS,
        "training": {"epochs": 5, "lr": 3e-3},
    }
    data.update(overrides)
    return data


def crash_after_checkpoint(monkeypatch, epoch):
    """Simulate a crash right after the checkpoint of `epoch` is stored."""
    store = distill._store_checkpoint

    def store_then_crash(ctx, completed, *args):
        store(ctx, completed, *args)
        if completed == epoch:
            raise RuntimeError(f"simulated crash after epoch {epoch}")

    monkeypatch.setattr(distill, "_store_checkpoint", store_then_crash)
    return lambda: monkeypatch.setattr(distill, "_store_checkpoint", store)  # no more crashes


def state_of(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_small_student_keeps_most_of_the_teachers_accuracy_and_other_steps_can_load_it(teacher_path, tmp_path, cache_dir):
    result = run_step("distill", spec(teacher_path, tmp_path / "out", baseline=True), quiet=True)

    assert result.params_ratio <= 0.25
    assert result.teacher_accuracy >= 0.9
    assert result.student_accuracy >= 0.85 * result.teacher_accuracy
    assert result.baseline_accuracy is not None
    assert result.accuracy_gain == pytest.approx(result.student_accuracy - result.baseline_accuracy)
    assert {"model.pt", "student.pth", "history.json"} <= set(result.artifacts)
    assert (tmp_path / "out" / "manifest.json").is_file()
    test = split("test")
    scripted = load_torch(ModelRef(uri=result.artifacts["model.pt"].uri), tmp_path / "out" / "model.pt")
    rebuilt_ref = ModelRef(
        uri=result.artifacts["student.pth"].uri, factory=result.student_factory, factory_kwargs=result.student_factory_kwargs
    )
    rebuilt = load_torch(rebuilt_ref, tmp_path / "out" / "student.pth")
    assert accuracy(scripted, test) == pytest.approx(result.student_accuracy)
    assert accuracy(rebuilt, test) == pytest.approx(result.student_accuracy)


def test_teacher_logits_are_computed_once_and_reused_by_another_student(teacher_path, tmp_path, cache_dir):
    first = run_step("distill", spec(teacher_path, tmp_path / "a", training={"epochs": 1}), quiet=True)
    second = run_step(
        "distill",
        spec(teacher_path, tmp_path / "b", student={"architecture": "digits_cnn", "width": 0.25}, training={"epochs": 1}),
        quiet=True,
    )

    assert not first.teacher_logits_cached
    assert second.teacher_logits_cached
    assert second.teacher_accuracy == first.teacher_accuracy
    assert len(list((cache_dir / "teacher-logits").glob("*.npz"))) == 2  # train split and test split


def test_same_seed_gives_identical_student_weights(teacher_path, tmp_path, cache_dir):
    small = {"training": {"epochs": 2}, "student": {"architecture": "digits_cnn", "width": 0.25}}

    run_step("distill", spec(teacher_path, tmp_path / "a", seed=5, **small), use_cache=False, quiet=True)
    run_step("distill", spec(teacher_path, tmp_path / "b", seed=5, **small), use_cache=False, quiet=True)
    run_step("distill", spec(teacher_path, tmp_path / "c", seed=6, **small), use_cache=False, quiet=True)

    a, b, c = (state_of(tmp_path / n / "student.pth") for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_crash_then_rerun_resumes_from_checkpoint_and_matches_uninterrupted_run(teacher_path, tmp_path, cache_dir, monkeypatch):
    params = {"training": {"epochs": 4, "lr": 3e-3}, "student": {"architecture": "digits_cnn", "width": 0.25}}
    uninterrupted = run_step("distill", spec(teacher_path, tmp_path / "clean", **params), quiet=True)

    heal = crash_after_checkpoint(monkeypatch, epoch=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_step("distill", spec(teacher_path, tmp_path / "out", **params), use_cache=False, quiet=True)
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] == ["epoch-2.pt"]
    assert not (tmp_path / "out" / "manifest.json").exists()
    heal()

    resumed = run_step("distill", spec(teacher_path, tmp_path / "out", **params), use_cache=False, quiet=True)

    assert resumed.resumed_from_epoch == 2
    assert uninterrupted.resumed_from_epoch is None
    assert resumed.epochs_run == 4
    a, b = state_of(tmp_path / "clean" / "student.pth"), state_of(tmp_path / "out" / "student.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.student_accuracy == uninterrupted.student_accuracy
    # published: the checkpoints (model-sized, outside the manifest) are gone
    assert not (tmp_path / "out" / "checkpoints").exists() and not (tmp_path / "clean" / "checkpoints").exists()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file()} <= {
        *manifest["artifacts"], "manifest.json", "result.json", ".mnnpipe.lock"
    }


def test_checkpoint_of_a_different_spec_is_not_resumed(teacher_path, tmp_path, cache_dir, monkeypatch):
    params = {"student": {"architecture": "digits_cnn", "width": 0.25}}

    heal = crash_after_checkpoint(monkeypatch, epoch=1)
    with pytest.raises(RuntimeError):
        run_step("distill", spec(teacher_path, tmp_path / "out", training={"epochs": 3}, **params), quiet=True)
    heal()
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] == ["epoch-1.pt"]

    result = run_step("distill", spec(teacher_path, tmp_path / "out", training={"epochs": 3, "lr": 5e-3}, **params), quiet=True)

    assert result.resumed_from_epoch is None
    assert result.epochs_run == 3


def test_pruned_torchscript_student_is_fine_tuned(teacher_path, tmp_path, cache_dir):
    # Stand-in for prune's output: an untrained, traced TorchScript model (no Python class needed).
    torch.manual_seed(1)
    student_path = save_torchscript(digits_cnn(width=0.5), (torch.rand(1, 1, 8, 8),), tmp_path / "pruned.pt")
    test = split("test")
    before = accuracy(torch.jit.load(str(student_path)), test)

    result = run_step("distill", spec(teacher_path, tmp_path / "out", student={"model": {"uri": str(student_path)}}), quiet=True)

    assert before < 0.3
    assert result.student_accuracy >= 0.8
    assert result.student_factory is None
    assert "model.pt" in result.artifacts and "student.pth" not in result.artifacts
    assert accuracy(torch.jit.load(str(tmp_path / "out" / "model.pt")), test) == pytest.approx(result.student_accuracy)


def test_feature_distillation_on_named_layer_pairs(teacher_path, tmp_path, cache_dir):
    pairs = [{"student": "features.3", "teacher": "features.3"}, {"student": "classifier.2", "teacher": "classifier.2"}]

    result = run_step("distill", spec(teacher_path, tmp_path / "out", features=pairs, beta=0.5), quiet=True)

    assert result.student_accuracy >= 0.85 * result.teacher_accuracy
    # projections are training aids: the published student has exactly the architecture's weights
    assert set(state_of(tmp_path / "out" / "student.pth")) == set(digits_cnn(width=STUDENT_WIDTH).state_dict())


def test_unknown_feature_layer_is_an_input_error_naming_features(teacher_path, tmp_path, cache_dir):
    pairs = [{"student": "features.77", "teacher": "features.3"}]

    with pytest.raises(InputError, match=r"^features: student has no layer named 'features.77'"):
        run_step("distill", spec(teacher_path, tmp_path / "out", features=pairs), quiet=True)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"student": {"architecture": "digits_cnn", "factory_kwargs": {"num_classes": 5}}},
            r"^student: model outputs 5 classes but the dataset has 10",
        ),
        (
            {"student": {"factory": "mnnpipe.models:digits_cnn", "factory_kwargs": {"num_classes": 12}}},
            r"^student: model outputs 12 classes",
        ),
    ],
)
def test_student_class_count_must_match_dataset(teacher_path, tmp_path, cache_dir, overrides, message):
    with pytest.raises(InputError, match=message):
        run_step("distill", spec(teacher_path, tmp_path / "out", **overrides), quiet=True)
    assert not (tmp_path / "out" / "manifest.json").exists() and not (tmp_path / "out" / "model.pt").exists()


def test_teacher_class_count_must_match_dataset(teacher_path, tmp_path, cache_dir):
    # A 3-class dataset (digits 0-2 only) against the 10-class teacher.
    digits = split("all")
    keep = digits.y < 3
    npz = tmp_path / "three.npz"
    np.savez(npz, x=digits.raw[keep][..., 0], y=digits.y[keep])
    data = {"format": "npz", "uri": str(npz), "preprocess": {"channels": "GRAY"}}

    with pytest.raises(InputError, match=r"^teacher: model outputs 10 classes but the dataset has 3"):
        run_step("distill", spec(teacher_path, tmp_path / "out", dataset=data), quiet=True)


def test_missed_accuracy_budget_fails_and_publishes_nothing(teacher_path, tmp_path, cache_dir):
    with pytest.raises(StepFailed, match="below min_accuracy_ratio 1.5"):
        run_step("distill", spec(teacher_path, tmp_path / "out", training={"epochs": 1}, min_accuracy_ratio=1.5), quiet=True)

    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not (tmp_path / "out" / "model.pt").exists()


def test_checkpoints_and_teacher_logits_live_in_s3_for_an_s3_output(teacher_path, s3_bucket, s3_server, monkeypatch):
    monkeypatch.delenv("MNNPIPE_CACHE_URI", raising=False)
    output = f"s3://{s3_bucket}/runs/distill"
    params = {"student": {"architecture": "digits_cnn", "width": 0.25}, "training": {"epochs": 2}}

    heal = crash_after_checkpoint(monkeypatch, epoch=1)
    with pytest.raises(RuntimeError):
        run_step("distill", spec(teacher_path, output, **params), quiet=True)
    heal()
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert "runs/distill/checkpoints/epoch-1.pt" in keys

    result = run_step("distill", spec(teacher_path, output, **params), quiet=True)

    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert not any(k.startswith("runs/distill/checkpoints/") for k in keys)  # removed once published
    assert result.resumed_from_epoch == 1
    assert "runs/distill/model.pt" in keys and "runs/distill/manifest.json" in keys
    assert sum(k.startswith(".mnnpipe-cache/teacher-logits/") for k in keys) == 2
    assert result.artifacts["model.pt"].uri == f"{output}/model.pt"


def torch_and_env_settings():
    return (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.get_num_threads(),
        os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD"),
    )


def test_an_in_process_run_leaves_torch_and_the_environment_as_it_found_them(teacher_path, tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0")
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(2)
    before = torch_and_env_settings()
    try:
        params = {"student": {"architecture": "digits_cnn", "width": 0.25}, "training": {"epochs": 1}}
        run_step("distill", spec(teacher_path, tmp_path / "out", **params), quiet=True)  # seeds: deterministic mode on
        after = torch_and_env_settings()
    finally:
        torch.set_num_threads(1)
    assert after == before


def test_what_a_step_changes_for_the_process_is_put_back_even_when_it_fails(monkeypatch):
    from mnnpipe.runner import _process_settings_kept

    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    before = torch_and_env_settings()
    with pytest.raises(RuntimeError), _process_settings_kept():
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.set_num_threads(3)
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
        raise RuntimeError("the step failed")
    assert torch_and_env_settings() == before
