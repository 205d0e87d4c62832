"""Full int8 of models with several inputs: every input reaches MNN's quantizer (sequence layout)
and the fidelity check; calibration from an npz with one array per input name, or random."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mnnpipe.data import load_named_samples
from mnnpipe.engines.mnn import load_session
from mnnpipe.errors import InputError
from mnnpipe.specs import DatasetRef, TensorSpec

pytestmark = pytest.mark.integration

FEATURES = 32
GATED_INPUTS = [
    {"name": "features", "shape": [1, FEATURES]},
    {"name": "gate_id", "shape": [1, 1], "dtype": "int64", "range": [0, 10]},
]


class _Gated(torch.nn.Module):
    """features -> hidden, scaled by a gain looked up from an int64 id (gain 0.05 for id 0 up to 10
    for id 9) -> output. The ranges int8 needs after the gain depend on the ids calibrated on."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(FEATURES, 64)
        self.gain = torch.nn.Embedding(10, 1)
        self.out = torch.nn.Linear(64, 16)
        with torch.no_grad():
            self.gain.weight.copy_(torch.linspace(0.05, 10.0, 10).unsqueeze(1))

    def forward(self, features: torch.Tensor, gate_id: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.inp(features)) * self.gain(gate_id).reshape(-1, 1))


def cli(step: str, spec: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / f"{step}-spec.json"
    path.write_text(json.dumps(spec))
    return subprocess.run(
        [sys.executable, "-m", "mnnpipe.cli", "--quiet", "run", step, "--spec", str(path), "--no-cache"],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def gated(tmp_path_factory) -> Path:
    from mnnpipe.modelio import save_torchscript

    root = tmp_path_factory.mktemp("gated")
    torch.manual_seed(0)
    example = (torch.rand(1, FEATURES), torch.zeros(1, 1, dtype=torch.int64))
    save_torchscript(_Gated().eval(), example, root / "gated.pt")
    return root / "gated.pt"


def calibration_npz(path: Path, gate_ids: np.ndarray) -> Path:
    rng = np.random.default_rng(7)
    np.savez(path, features=rng.uniform(0, 1, (len(gate_ids), FEATURES)).astype(np.float32), gate_id=gate_ids.reshape(-1, 1))
    return path


def int8_spec(model: Path, out: Path, calibration: Path | None) -> dict:
    spec = {"model": {"uri": str(model)}, "inputs": GATED_INPUTS, "mode": "full-int8", "output": str(out), "num_samples": 32}
    if calibration is not None:
        spec["calibration"] = {"format": "npz", "uri": str(calibration)}
    return spec


def test_two_input_model_quantizes_full_int8_from_a_per_input_npz(gated, tmp_path):
    npz = calibration_npz(tmp_path / "calib.npz", np.arange(40) % 10)

    proc = cli("quantize", int8_spec(gated, tmp_path / "out", npz), tmp_path)

    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["quantized"]["cosine"] >= 0.99, result["quantized"]
    assert result["op_types"].get("Convolution[int8]", 0) >= 2, result["op_types"]
    session = load_session(tmp_path / "out" / "model.mnn", input_names=["features", "gate_id"])
    assert session.input_names == ["features", "gate_id"]


def test_calibration_that_never_saw_the_second_inputs_range_fails_the_check(gated, tmp_path):
    """Calibrated only on gate id 0 (gain 0.05), checked on ids 0-9 (gains up to 10): int8 ranges
    are 200x too small, so the check over every input must catch it and publish nothing."""
    npz = calibration_npz(tmp_path / "calib.npz", np.zeros(40, np.int64))

    proc = cli("quantize", int8_spec(gated, tmp_path / "out", npz), tmp_path)

    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "full-int8 model misses the budget: cosine" in proc.stderr
    assert not (tmp_path / "out" / "model.mnn").exists()


def test_two_input_model_calibrates_on_random_inputs_without_a_dataset(gated, tmp_path):
    proc = cli("quantize", int8_spec(gated, tmp_path / "out", None), tmp_path)

    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["quantized"]["cosine"] >= 0.99


# --------------------------------------------------------------------------- per-input npz


def _inputs() -> list[TensorSpec]:
    return [TensorSpec(**t) for t in GATED_INPUTS]


def test_per_input_npz_keeps_token_ids_integer_and_groups_samples(tmp_path):
    npz = calibration_npz(tmp_path / "c.npz", np.arange(5))

    samples = load_named_samples(DatasetRef(format="npz", uri=str(npz)), npz, _inputs())

    assert len(samples) == 5
    assert samples[3][0].shape == (1, FEATURES) and samples[3][0].dtype == np.float32
    assert samples[3][1].dtype == np.int64 and samples[3][1].tolist() == [[3]]


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"features": np.zeros((4, FEATURES), np.float32)}, "no array for input(s) ['gate_id']"),
        ({"features": np.zeros((4, FEATURES), np.float32), "gate_id": np.zeros((3, 1))}, "different sample counts"),
        ({"features": np.zeros((4, 8), np.float32), "gate_id": np.zeros((4, 1))}, "array 'features' has shape [4, 8]"),
        ({"features": np.zeros((4, FEATURES), np.float32), "gate_id": np.full((4, 1), 0.5)}, "holds fractions"),
    ],
)
def test_per_input_npz_refuses_what_does_not_fit_the_inputs(arrays, message, tmp_path):
    np.savez(tmp_path / "bad.npz", **arrays)

    with pytest.raises(InputError, match=None) as exc:
        load_named_samples(DatasetRef(format="npz", uri=str(tmp_path / "bad.npz")), tmp_path / "bad.npz", _inputs())

    assert message in str(exc.value)


# --------------------------------------------------------------------------- transformer encoder

TOKENS = 16
ENCODER_INPUTS = [
    {"name": "input_ids", "shape": [1, TOKENS], "dtype": "int64", "range": [0, 100]},
    {"name": "attention_mask", "shape": [1, TOKENS], "dtype": "int64", "range": [1, 2]},
]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> dict:
    from mnnpipe.models import text_encoder

    root = tmp_path_factory.mktemp("encoder")
    torch.manual_seed(0)
    torch.save(text_encoder().eval().state_dict(), root / "encoder.pth")
    return {"uri": str(root / "encoder.pth"), "factory": "mnnpipe.models:text_encoder"}


def test_transformer_encoder_quantizes_full_int8_under_ema(encoder, tmp_path):
    spec = {"model": encoder, "inputs": ENCODER_INPUTS, "mode": "full-int8", "activation_method": "EMA", "output": str(tmp_path / "out")}

    proc = cli("quantize", spec, tmp_path)

    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["quantized"]["cosine"] >= 0.99, result["quantized"]
    assert result["op_types"].get("Convolution[int8]", 0) >= 8, result["op_types"]


def test_transformer_encoder_under_kl_fails_in_one_line_naming_the_crash_and_the_remedy(encoder, tmp_path):
    """MNN 3.6.1's KL calibration segfaults on activations holding -inf (the attention mask's
    masked_fill); the step says so in one line, exits 1 and publishes nothing."""
    spec = {"model": encoder, "inputs": ENCODER_INPUTS, "mode": "full-int8", "output": str(tmp_path / "out")}

    proc = cli("quantize", spec, tmp_path)

    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "crashed with SIGSEGV" in error[0] and "-inf" in error[0] and "activation_method EMA" in error[0], proc.stderr
    assert not (tmp_path / "out" / "model.mnn").exists()


class _TwoInTwoOut(torch.nn.Module):
    """An image and a feature vector in; logits and an embedding out. MNN's quantizer writes the
    int8 model's outputs in another order than the fp32 model's (found by benchmarks/bench_models.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
        )
        self.meta = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
        self.logits = torch.nn.Linear(24, 10)
        self.embed = torch.nn.Linear(24, 16)

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.cat([self.conv(image), self.meta(meta)], 1)
        return self.logits(h), self.embed(h)


def test_two_outputs_are_compared_by_name_not_by_position(tmp_path):
    from mnnpipe.modelio import save_torchscript
    from mnnpipe.runner import run_step

    torch.manual_seed(0)
    inputs = [{"name": "image", "shape": [1, 3, 16, 16]}, {"name": "meta", "shape": [1, 8], "range": [-1, 1]}]
    example = (torch.rand(1, 3, 16, 16), torch.rand(1, 8))
    save_torchscript(_TwoInTwoOut().eval(), example, tmp_path / "two.pt")
    fp32 = run_step(
        "convert",
        {"model": {"uri": str(tmp_path / "two.pt")}, "inputs": inputs, "num_samples": 4, "tolerance": {"output_kind": "other"}, "output": str(tmp_path / "fp32")},
        use_cache=False,
        quiet=True,
    )
    fp32_mnn = fp32.artifacts["model.mnn"].uri
    spec = {
        "model": {"uri": fp32_mnn}, "inputs": inputs, "mode": "full-int8", "num_samples": 16, "calibration_samples": 16,
        "activation_method": "EMA", "batch_size": 1, "output": str(tmp_path / "int8"),
        "fidelity": {"max_abs_error": None, "min_cosine": 0.95, "min_top1_agreement": 0.0, "output_kind": "other"},
    }
    result = run_step("quantize", spec, use_cache=False, quiet=True)
    assert result.quantized.cosine >= 0.95
    # the premise: the two files list their outputs in different orders
    int8_names = load_session(Path(result.artifacts["model.mnn"].uri), input_names=["image", "meta"]).output_names
    fp32_names = load_session(Path(fp32_mnn), input_names=["image", "meta"]).output_names
    assert sorted(int8_names) == sorted(fp32_names) and int8_names != fp32_names
