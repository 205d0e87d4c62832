"""Datasets: an image folder (one sub-folder per class), `.npz` arrays, or scikit-learn's digits.

Whatever the source, a dataset becomes `Dataset(x, y, classes, raw)`: `x` float32 in the model's
layout after preprocessing, `y` int64 labels (or None), and `raw` the uint8 HWC images before
normalisation (what MNN's calibration tool reads), when the samples are images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .specs import DatasetRef, Preprocess

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".webp"}
SPLIT_FRACTIONS = {"test": 0.2, "val": 0.1}
_SPLIT_SEED = 0  # fixed, so every step of a pipeline sees the same train/val/test partition


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray
    y: np.ndarray | None
    classes: tuple[str, ...]
    raw: np.ndarray | None = None  # uint8 (N, H, W, C) images, before normalisation

    def __len__(self) -> int:
        return len(self.x)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_dataset(ref: DatasetRef, local: Path | None = None) -> Dataset:
    """Load, split and preprocess. `local` is the fetched file or folder for `ref.uri`."""
    if ref.format == "sklearn-digits":
        raw, y, classes = _digits()
    elif local is None:
        raise InputError(f"{ref.uri}: dataset was not fetched")
    elif ref.format == "image-folder":
        raw, y, classes = _image_folder(local, ref.preprocess)
    else:
        raw, y, classes = _npz(local)
    if len(raw) == 0:
        raise InputError(f"{ref.uri or ref.format}: dataset is empty")
    idx = split_indices(len(raw), y, ref.split)
    if ref.limit is not None:
        idx = idx[: ref.limit]
    if len(idx) == 0:
        raise InputError(f"{ref.uri or ref.format}: split '{ref.split}' is empty")
    raw = raw[idx]
    y = None if y is None else y[idx]
    if raw.ndim == 2:  # (N, features): only scale/mean/std apply
        p = ref.preprocess
        x = ((raw.astype(np.float32) / p.scale) - p.mean[0]) / p.std[0]
        return Dataset(x.astype(np.float32), y, classes, None)
    images = _resize_and_convert(raw, ref.preprocess, ref.uri or ref.format)
    return Dataset(normalize(images, ref.preprocess), y, classes, images)


def split_indices(n: int, y: np.ndarray | None, split: str) -> np.ndarray:
    """Deterministic, stratified partition: 70% train, 10% val, 20% test."""
    idx = np.arange(n)
    if split == "all":
        return idx
    from sklearn.model_selection import train_test_split

    strat = y if y is not None and np.bincount(y).min() >= 5 else None
    rest, test = train_test_split(idx, test_size=SPLIT_FRACTIONS["test"], random_state=_SPLIT_SEED, stratify=strat)
    if split == "test":
        return np.sort(test)
    strat_rest = None if strat is None else y[rest]
    val_share = SPLIT_FRACTIONS["val"] / (1 - SPLIT_FRACTIONS["test"])
    train, val = train_test_split(rest, test_size=val_share, random_state=_SPLIT_SEED, stratify=strat_rest)
    return np.sort(val if split == "val" else train)


def normalize(images: np.ndarray, p: Preprocess) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 in the model's layout: (src / scale - mean) / std."""
    x = images.astype(np.float32) / p.scale
    x = (x - np.asarray(p.per_channel("mean"), np.float32)) / np.asarray(p.per_channel("std"), np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if p.layout == "NCHW" else x)


def _resize_and_convert(raw: np.ndarray, p: Preprocess, label: str) -> np.ndarray:
    """Bring raw images (N, H, W[, C]) to uint8 (N, H', W', C) with the channels the model wants."""
    from PIL import Image

    if raw.ndim == 3:
        raw = raw[..., None]
    if raw.ndim != 4 or raw.shape[-1] not in (1, 3, 4):
        raise InputError(f"{label}: samples must be images (N, H, W[, 1|3|4]), got shape {list(raw.shape)}")
    if raw.dtype != np.uint8:
        raise InputError(f"{label}: image arrays must be uint8 0-255, got {raw.dtype}")
    want_c = 1 if p.channels == "GRAY" else 3
    out = []
    for img in raw:
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        pil = pil.convert("L" if want_c == 1 else "RGB")
        if p.size is not None and pil.size != (p.size[1], p.size[0]):
            pil = pil.resize((p.size[1], p.size[0]), Image.BILINEAR)
        arr = np.asarray(pil, dtype=np.uint8)
        out.append(arr[..., None] if arr.ndim == 2 else arr)
    images = np.stack(out)
    return images[..., ::-1].copy() if p.channels == "BGR" else images


def _digits() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    # 0..16 ink levels -> 0..255 so the same preprocessing serves digits and ordinary images
    raw = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    return raw, d.target.astype(np.int64), tuple(str(c) for c in range(10))


def _image_folder(root: Path, p: Preprocess) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    from PIL import Image, UnidentifiedImageError

    if not root.is_dir():
        raise InputError(f"{root}: image-folder dataset must be a folder with one sub-folder per class")
    classes = tuple(sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")))
    if not classes:
        raise InputError(f"{root}: no class sub-folders found (expected <root>/<class>/<image>)")
    mode = "L" if p.channels == "GRAY" else "RGB"
    images, labels, first_size = [], [], None
    for label, cls in enumerate(classes):
        for path in sorted((root / cls).iterdir()):
            if path.name.startswith(".") or not path.is_file():
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise InputError(f"{path}: not an image (expected one of {sorted(IMAGE_EXTENSIONS)})")
            try:
                with Image.open(path) as im:
                    im = im.convert(mode)
                    if p.size is not None:
                        im = im.resize((p.size[1], p.size[0]), Image.BILINEAR)
                    arr = np.asarray(im, dtype=np.uint8)
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise InputError(f"{path}: unreadable image ({type(e).__name__})") from None
            if first_size is None:
                first_size = arr.shape
            elif arr.shape != first_size:
                raise InputError(
                    f"{path}: image size {list(arr.shape)} differs from {list(first_size)}; set preprocess.size to resize"
                )
            images.append(arr)
            labels.append(label)
    if not images:
        raise InputError(f"{root}: no images found under the class folders")
    return np.stack(images), np.asarray(labels, np.int64), classes


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...]]:
    try:
        with np.load(path, allow_pickle=False) as f:  # never unpickle: .npz may be untrusted
            if "x" not in f:
                raise InputError(f"{path}: .npz must contain an array named 'x' (and optionally 'y')")
            x = f["x"]
            y = f["y"].astype(np.int64) if "y" in f else None
    except InputError:
        raise
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path}: not a readable .npz archive ({type(e).__name__}: {str(e)[:80]})") from None
    if y is not None and (y.ndim != 1 or len(y) != len(x)):
        raise InputError(f"{path}: 'y' must be 1-D with one label per sample ({len(x)}), got shape {list(y.shape)}")
    if y is not None and len(y) and y.min() < 0:
        raise InputError(f"{path}: labels in 'y' must be >= 0")
    n_classes = int(y.max()) + 1 if y is not None and len(y) else 0
    return x, y, tuple(str(i) for i in range(n_classes))
