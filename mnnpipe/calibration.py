"""Calibration data for MNN's offline int8 quantizer, written from a Dataset.

The quantizer reads samples from a folder, in one of two layouts:

* images: one PNG per sample, plus config keys that redo our preprocessing inside MNN
  (`format`, `mean`, `normal`, `width`, `height`). Used when the dataset has raw uint8 images:
  PNG is lossless, so MNN sees exactly the pixels we do.
* sequence (`input_type: "sequence"`): one sub-folder per sample with `input.json` (name and
  shape of each input) and `<input name>.txt` holding the preprocessed float values. Used for
  non-image data (`.npz` features), where there is no image for MNN to preprocess.

MNN computes dst = (src - mean) * normal on raw pixel values; our Preprocess computes
dst = (src / scale - mean) / std, so mean_mnn = mean * scale and normal = 1 / (scale * std).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data import Dataset
from .errors import InputError
from .specs import Preprocess


@dataclass(frozen=True)
class CalibrationSet:
    """A calibration folder and the quantizer config keys that describe it."""

    path: Path
    samples: int
    layout: str  # "images" | "sequence"
    config: dict[str, Any]  # keys for MNN's quantizer config: path, sample count, preprocessing


def check_matches_input(data: Dataset, input_shape: tuple[int, ...], input_name: str, label: str) -> None:
    """Raise InputError when one sample does not have the shape of the model's (batch-1) input."""
    sample = tuple(data.x.shape[1:])
    want = tuple(input_shape[1:])
    if sample == want:
        return
    hint = ""
    if len(sample) == 3 and len(want) == 3:
        hint = " (check preprocess.size, preprocess.channels and preprocess.layout)"
    raise InputError(
        f"{label}: samples have shape {list(sample)} but the model's input '{input_name}' takes "
        f"{list(want)} per sample{hint}"
    )


def write_calibration(
    data: Dataset, folder: Path, preprocess: Preprocess, *, input_name: str, input_shape: tuple[int, ...], limit: int
) -> CalibrationSet:
    """Write at most `limit` samples of `data` into `folder` in a layout MNN's quantizer reads."""
    if len(data) == 0:
        raise InputError("calibration: the dataset has no samples")
    check_matches_input(data, input_shape, input_name, "calibration")
    n = min(limit, len(data))
    folder.mkdir(parents=True, exist_ok=True)
    if data.raw is not None and preprocess.layout == "NCHW" and len(input_shape) == 4:
        return _write_images(data.raw[:n], folder, preprocess)
    return _write_sequence(data.x[:n], folder, input_name)


def _write_images(raw: np.ndarray, folder: Path, p: Preprocess) -> CalibrationSet:
    from PIL import Image

    for i, img in enumerate(raw):
        if p.channels == "BGR":
            img = img[..., ::-1]  # Dataset.raw is already in model order; MNN wants RGB files and swaps itself
        Image.fromarray(np.ascontiguousarray(img[..., 0] if img.shape[-1] == 1 else img)).save(folder / f"{i:06d}.png")
    height, width = int(raw.shape[1]), int(raw.shape[2])
    mean = [m * p.scale for m in p.per_channel("mean")]
    normal = [1.0 / (p.scale * s) for s in p.per_channel("std")]
    config = {
        "format": p.channels,
        "mean": mean,
        "normal": normal,
        "width": width,
        "height": height,
        "path": str(folder),
        "used_image_num": len(raw),
    }
    return CalibrationSet(folder, len(raw), "images", config)


def write_multi_input_calibration(samples: list[list[np.ndarray]], inputs: list, folder: Path) -> CalibrationSet:
    """Samples of a model with several inputs (one array per TensorSpec in `inputs`, in order) in
    the quantizer's sequence layout: every sample folder has one <name>.txt per input."""
    if not samples:
        raise InputError("calibration: the dataset has no samples")
    folder.mkdir(parents=True, exist_ok=True)
    shapes = [{"name": t.name, "shape": list(t.shape)} for t in inputs]
    for i, sample in enumerate(samples):
        d = folder / f"{i:06d}"
        d.mkdir(exist_ok=True)
        (d / "input.json").write_text(json.dumps({"inputs": shapes}))
        for t, a in zip(inputs, sample, strict=True):
            # MNN reads every value as a double and casts to the input's type: integers written whole
            np.savetxt(d / f"{t.name}.txt", a.reshape(1, -1), fmt="%d" if a.dtype.kind in "iu" else "%.9g")
    config = {"input_type": "sequence", "path": str(folder), "used_sample_num": len(samples), "inputs": shapes}
    return CalibrationSet(folder, len(samples), "sequence", config)


def _write_sequence(x: np.ndarray, folder: Path, input_name: str) -> CalibrationSet:
    shape = [1, *x.shape[1:]]
    for i, sample in enumerate(x):
        d = folder / f"{i:06d}"
        d.mkdir(exist_ok=True)
        (d / "input.json").write_text(json.dumps({"inputs": [{"name": input_name, "shape": shape}]}))
        # one line of values per sample; %.9g round-trips float32 exactly
        np.savetxt(d / f"{input_name}.txt", sample.reshape(1, -1), fmt="%.9g")
    config = {"input_type": "sequence", "path": str(folder), "used_sample_num": len(x)}
    return CalibrationSet(folder, len(x), "sequence", config)
