"""PTQ vs QAT int8 accuracy on digits MLPs built so that MNN's post-training int8 loses accuracy.

    python benchmarks/bench_qat.py [--gains 1 10 30 300] [--epochs 20]

Each model: a digits MLP (64-64-10) trained 8 epochs, then one hidden unit (the most active) is
scaled up by `gain` and its outgoing weights down by `gain` - the same fp32 function, but that
unit sets the hidden layer's per-tensor int8 activation scale. PTQ: the quantize step (KL,
MAX_ABS, 100 calibration samples). QAT: mnnpipe.qat fine-tune (Adam lr 1e-3, `--epochs`), scales
written as MNN compression params, MNNConvert --compressionParamsFile. Accuracy on the test split.
Prints a markdown table (see benchmarks/results/qat.md).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import numpy as np
import torch

from mnnpipe.data import load_dataset
from mnnpipe.engines.mnn import convert_onnx_to_mnn, load_session, op_types
from mnnpipe.engines.onnx_export import export_onnx
from mnnpipe.qat import QatModel, write_compression_params
from mnnpipe.runner import run_step
from mnnpipe.specs import DatasetRef
from mnnpipe.train import FitConfig, fit

GRAY = {"channels": "GRAY"}


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 64)
        self.fc2 = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def to_mnn(model: torch.nn.Module, root: Path, name: str, params: Path | None = None) -> Path:
    export_onnx(model, (torch.rand(1, 1, 8, 8),), root / f"{name}.onnx", input_names=["input"], dynamic_batch=False)
    convert_onnx_to_mnn(root / f"{name}.onnx", root / f"{name}.mnn", compression_params=params)
    return root / f"{name}.mnn"


def accuracy(path: Path, data) -> float:
    s = load_session(path)
    out = np.concatenate([s.run([data.x[i : i + 1]])[0].reshape(1, -1) for i in range(len(data))])
    return float((out.argmax(1) == data.y).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gains", type=float, nargs="+", default=[1, 10, 30, 300])
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args()
    train = load_dataset(DatasetRef(format="sklearn-digits", split="train", preprocess=GRAY))
    test = load_dataset(DatasetRef(format="sklearn-digits", split="test", preprocess=GRAY))
    torch.manual_seed(0)
    base = MLP()
    fit(base, train, FitConfig(epochs=8, lr=3e-3, seed=0))
    base.eval()
    with torch.no_grad():
        unit = int(torch.relu(base.fc1(torch.from_numpy(train.x).flatten(1))).mean(0).argmax())
    print("| outlier gain | fp32 acc | PTQ int8 acc (drop pp) | QAT int8 acc (drop pp) | QAT int8 layers |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for gain in args.gains:
            root = Path(tmp) / f"g{gain:g}"
            root.mkdir()
            model = copy.deepcopy(base)
            with torch.no_grad():
                model.fc1.weight[unit] *= gain
                model.fc1.bias[unit] *= gain
                model.fc2.weight[:, unit] /= gain
            fp32 = to_mnn(model, root, "fp32")
            ptq = run_step(
                "quantize",
                {
                    "model": {"uri": str(fp32)},
                    "calibration": {"format": "sklearn-digits", "split": "train", "limit": 100, "preprocess": GRAY},
                    "evaluation": {"format": "sklearn-digits", "split": "test", "preprocess": GRAY},
                    "max_accuracy_drop": 100,
                    "output": str(root / "ptq"),
                },
                quiet=True,
            )
            qat = QatModel(copy.deepcopy(model))
            qat.fine_tune(train.x, train.y, epochs=args.epochs, lr=1e-3)
            scales = qat.strip()
            export_onnx(qat.model, (torch.rand(1, 1, 8, 8),), root / "qat-src.onnx", input_names=["input"], dynamic_batch=False)
            missing = write_compression_params(root / "qat-src.onnx", scales, root / "qat.params")
            assert not missing, missing
            q = to_mnn(qat.model, root, "qat", root / "qat.params")
            fp32_acc, q_acc = ptq.fp32.accuracy, accuracy(q, test)
            int8 = op_types(q).get("Convolution[int8]", 0)
            print(
                f"| {gain:g} | {fp32_acc:.4f} | {ptq.quantized.accuracy:.4f} ({ptq.quantized.accuracy_drop_pp:.1f}) | "
                f"{q_acc:.4f} ({(fp32_acc - q_acc) * 100:.1f}) | {int8} of 2 |",
                flush=True,
            )


if __name__ == "__main__":
    main()
