"""The prune step end to end: real Torch-Pruning on MobileNetV2 / ResNet-18 (converted to MNN and
verified by the convert step) and on a trained digits CNN (accuracy recovers after fine-tuning)."""

from __future__ import annotations

import pytest
import torch

from mnnpipe.data import load_dataset
from mnnpipe.errors import InputError, SpecError, StepFailed
from mnnpipe.models import digits_cnn, mobilenet_v2, resnet18
from mnnpipe.runner import run_step
from mnnpipe.specs import DatasetRef
from mnnpipe.train import FitConfig, fit

pytestmark = pytest.mark.integration

DIGITS = {"format": "sklearn-digits", "preprocess": {"channels": "GRAY"}}


def digits(split: str) -> dict:
    return {**DIGITS, "split": split}


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory) -> str:
    torch.set_num_threads(1)  # tiny models: threads only contend on a shared 2-core box
    train = load_dataset(DatasetRef(**digits("train")))
    torch.manual_seed(0)  # the same initial weights in every run: the same teacher, the same pruned channels
    model = digits_cnn()
    fit(model, train, FitConfig(epochs=3, seed=0))
    path = tmp_path_factory.mktemp("teacher") / "digits.pth"
    torch.save(model.state_dict(), path)
    return str(path)


def teacher_ref(path: str) -> dict:
    return {"uri": path, "factory": "mnnpipe.models:digits_cnn"}


@pytest.mark.parametrize(
    ("factory", "build", "importance"),
    [("mobilenet_v2", mobilenet_v2, "l1"), ("resnet18", resnet18, "activation")],
)
def test_structured_pruning_shrinks_and_converts_to_mnn(tmp_path, cache_dir, factory, build, importance):
    kwargs = {"num_classes": 10, "width": 0.25}
    torch.manual_seed(0)
    torch.save(build(**kwargs).state_dict(), tmp_path / "m.pth")
    calib = tmp_path / "calib.npz"
    import numpy as np

    np.savez(calib, x=np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8))  # NHWC images
    spec = {
        "output": str(tmp_path / "pruned"),
        "model": {"uri": str(tmp_path / "m.pth"), "factory": f"mnnpipe.models:{factory}", "factory_kwargs": kwargs},
        "input": {"shape": [1, 3, 32, 32]},
        "importance": importance,
        "target": {"ratio": 0.5},
        "round_to": 4,
        "export_pt2": False,
    }
    if importance == "activation":
        spec["calibration"] = {"format": "npz", "uri": str(calib)}

    result = run_step("prune", spec)

    assert result.params_after < 0.5 * result.params_before
    assert result.macs_after < 0.5 * result.macs_before
    assert result.channels, "some layer must have lost channels"
    classifier = result.ignored_layers[0]
    assert classifier not in result.channels  # the output layer keeps its 10 classes
    pruned = torch.jit.load(result.artifacts["model.pt"].uri)
    assert pruned(torch.rand(3, 3, 32, 32)).shape == (3, 10)
    converted = run_step(
        "convert",
        {"output": str(tmp_path / "mnn"), "model": {"uri": result.artifacts["model.pt"].uri}, "inputs": [{"shape": [1, 3, 32, 32]}]},
    )
    assert converted.fidelity.cosine > 0.999
    assert converted.mnn_bytes < 0.6 * 4 * result.params_before  # below the unpruned fp32 weights alone


def test_digits_accuracy_recovers_after_finetuning_with_distillation(tmp_path, cache_dir, digits_teacher):
    spec = {
        "output": str(tmp_path / "out"),
        "model": teacher_ref(digits_teacher),
        "importance": "taylor",
        "scope": "global",
        "target": {"ratio": 0.6},
        "iterative_steps": 2,
        "finetune": {"dataset": digits("train"), "epochs": 2, "distill": True},
        "evaluation": digits("test"),
    }

    result = run_step("prune", spec)

    assert result.accuracy_before > 0.9
    assert result.accuracy_finetuned >= 0.85
    assert result.accuracy_finetuned >= result.accuracy_pruned
    assert result.params_ratio < 0.6
    assert len(result.steps) == 2 and result.steps[0].params > result.steps[1].params
    assert result.pt2_written
    exported = torch.export.load(result.artifacts["model.pt2"].uri).module()
    assert exported(torch.rand(5, 1, 8, 8)).shape == (5, 10)


def test_iterative_steps_follow_torch_prunings_schedule_to_the_one_step_result(tmp_path, cache_dir, digits_teacher):
    # One Torch-Pruning pruner with iterative_steps: step k keeps int(original * (1 - ratio * k / K)) channels per
    # layer, so the last step lands where a single step does (re-deriving a ratio from the already rounded counts
    # each step used to overshoot: 117 channels left instead of 122 here).
    base = {"model": teacher_ref(digits_teacher), "target": {"ratio": 0.5}, "input": {"shape": [1, 1, 8, 8]}, "export_pt2": False}

    one = run_step("prune", {**base, "output": str(tmp_path / "one")})
    three = run_step("prune", {**base, "output": str(tmp_path / "three"), "iterative_steps": 3})

    assert three.channels == one.channels
    assert [s.step for s in three.steps] == [1, 2, 3]
    assert three.steps[0].params > three.steps[1].params > three.steps[2].params == three.params_after == one.params_after


def test_params_budget_is_met(tmp_path, cache_dir, digits_teacher):
    spec = {
        "output": str(tmp_path / "out"),
        "model": teacher_ref(digits_teacher),
        "importance": "bn-scale",
        "target": {"by": "params", "count": 60_000},
        "input": {"shape": [1, 1, 8, 8]},
        "export_pt2": False,
    }

    result = run_step("prune", spec)

    assert result.params_before > 60_000 >= result.params_after
    assert result.params_after > 30_000  # bisection stops near the budget, not far below it


def test_unstructured_sparsity_is_counted_in_the_saved_weights(tmp_path, cache_dir, digits_teacher):
    spec = {
        "output": str(tmp_path / "out"),
        "model": teacher_ref(digits_teacher),
        "method": "unstructured",
        "sparsity": 0.8,
        "iterative_steps": 2,
        "finetune": {"dataset": digits("train"), "epochs": 1},
        "evaluation": digits("test"),
        "export_pt2": False,
    }

    result = run_step("prune", spec)

    saved = torch.jit.load(result.artifacts["model.pt"].uri).state_dict()
    weights = [t for name, t in saved.items() if name.endswith("weight") and t.dim() >= 2]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert result.zero_weights == zeros
    assert result.sparsity == pytest.approx(0.8, abs=0.01)
    assert result.params_after == result.params_before  # shapes are unchanged
    assert result.accuracy_after > 0.85


def test_unknown_layer_name_lists_close_matches(tmp_path, cache_dir, digits_teacher):
    spec = {"output": str(tmp_path / "out"), "model": teacher_ref(digits_teacher), "input": {"shape": [1, 1, 8, 8]}, "ignore": ["clasifier.3"]}

    with pytest.raises(SpecError, match=r"ignore: .*'clasifier.3'.*classifier\.3"):
        run_step("prune", spec)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_accuracy_budget_failure_publishes_nothing(tmp_path, cache_dir, digits_teacher):
    spec = {
        "output": str(tmp_path / "out"),
        "model": teacher_ref(digits_teacher),
        "target": {"ratio": 0.9},
        "max_layer_ratio": 0.95,
        "evaluation": digits("test"),
        "max_accuracy_drop": 1.0,
        "export_pt2": False,
    }

    with pytest.raises(StepFailed, match="max_accuracy_drop"):
        run_step("prune", spec)
    assert not (tmp_path / "out" / "model.pt").exists()
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_model_that_cannot_be_traced_is_an_input_error(tmp_path, cache_dir):
    # An LSTM returns a tuple (output, (h, c)): not the single tensor the step can trace and count.
    kwargs = {"input_size": 8, "hidden_size": 4, "batch_first": True}
    torch.save(torch.nn.LSTM(**kwargs).state_dict(), tmp_path / "m.pth")
    spec = {
        "output": str(tmp_path / "out"),
        "model": {"uri": str(tmp_path / "m.pth"), "factory": "torch.nn:LSTM", "factory_kwargs": kwargs},
        "input": {"shape": [1, 8, 8]},
    }

    with pytest.raises(InputError, match="model: expected one"):
        run_step("prune", spec)
