"""Datasets: an image folder (one sub-folder per class), `.npz` arrays, or scikit-learn's digits.

Whatever the source, a dataset becomes `Dataset(x, y, classes, raw)`: `x` float32 in the model's
layout after preprocessing, `y` int64 labels (or None), and `raw` the uint8 HWC images before
normalisation (what MNN's calibration tool reads), when the samples are images.
"""

from __future__ import annotations

import stat
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from .errors import InputError
from .specs import DatasetRef, Preprocess

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".webp"}
SPLIT_FRACTIONS = {"test": 0.2, "val": 0.1}
_SPLIT_SEED = 0  # fixed, so every step of a pipeline sees the same train/val/test partition
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
ARCHIVE_MAX_MEMBERS = 1_000_000  # more entries than any image dataset we load into memory
ARCHIVE_MAX_BYTES = 16 * 2**30  # uncompressed; a zip bomb stops here, not when the disk is full


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
    elif ref.format == "image-folder" and is_archive(local):
        # Extracted to a private temp folder, not beside the archive: local inputs are used in
        # place, so "beside" would write into the user's data folder. The images are read into
        # memory, so the folder is gone before this returns.
        with tempfile.TemporaryDirectory(prefix="mnnpipe-archive-") as tmp:
            try:
                raw, y, classes = _image_folder(extract_archive(local, Path(tmp)), ref.preprocess)
            except InputError as e:  # name the file inside the archive, not the temp folder
                raise InputError(str(e).replace(tmp, f"{local}!")) from None
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
    if strat is not None and _smallest_split(n) < len(np.unique(y)):
        strat = None  # stratifying needs one sample per class in every split (else sklearn raises)
    rest, test = train_test_split(idx, test_size=SPLIT_FRACTIONS["test"], random_state=_SPLIT_SEED, stratify=strat)
    if split == "test":
        return np.sort(test)
    strat_rest = None if strat is None else y[rest]
    val_share = SPLIT_FRACTIONS["val"] / (1 - SPLIT_FRACTIONS["test"])
    train, val = train_test_split(rest, test_size=val_share, random_state=_SPLIT_SEED, stratify=strat_rest)
    return np.sort(val if split == "val" else train)


def _smallest_split(n: int) -> int:
    """Samples in the smallest of train/val/test, as sklearn's train_test_split sizes them."""
    test = int(np.ceil(SPLIT_FRACTIONS["test"] * n))
    val = int(np.ceil(SPLIT_FRACTIONS["val"] / (1 - SPLIT_FRACTIONS["test"]) * (n - test)))
    return min(test, val, n - test - val)


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
        raise InputError(
            f"{root}: image-folder dataset must be a folder with one sub-folder per class, or a "
            f"{'/'.join(ARCHIVE_SUFFIXES)} archive of one"
        )
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


# --------------------------------------------------------------------------- archives


def is_archive(path: Path) -> bool:
    """A .zip, .tar, .tar.gz or .tgz file (judged by its name): an image folder packed for transport."""
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def extract_archive(archive: Path, dest: Path) -> Path:
    """Extract `archive` into `dest`, plain files and folders only; return the image folder's root.

    Refused with InputError naming the archive and the member: absolute paths, '..' segments,
    symbolic and hard links, devices and FIFOs, more than ARCHIVE_MAX_MEMBERS entries, more than
    ARCHIVE_MAX_BYTES uncompressed. Bytes are copied here (never extractall) and counted while
    copying, so a header that understates a size cannot pass the limit. When the archive holds a
    single top-level folder that holds the class folders, that folder is the root.
    """
    import zlib

    try:
        if archive.name.lower().endswith(".zip"):
            _extract_zip(archive, dest)
        else:
            _extract_tar(archive, dest)
    except InputError:
        raise
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, OSError, EOFError, ValueError) as e:
        raise InputError(f"{archive}: not a readable archive ({type(e).__name__}: {str(e)[:80]})") from None
    return _archive_root(dest)


class _Budget:
    """Members and uncompressed bytes seen so far; past ARCHIVE_MAX_* the archive is refused."""

    def __init__(self, archive: Path):
        self.archive, self.members, self.bytes = archive, 0, 0

    def member(self, name: str) -> None:
        self.members += 1
        if self.members > ARCHIVE_MAX_MEMBERS:
            raise InputError(f"{self.archive}: more than {ARCHIVE_MAX_MEMBERS} members (at {name!r}); refused")

    def add(self, n: int, name: str) -> None:
        self.bytes += n
        if self.bytes > ARCHIVE_MAX_BYTES:
            raise InputError(f"{self.archive}: more than {ARCHIVE_MAX_BYTES} bytes uncompressed (at member {name!r}); refused")


def _member_target(archive: Path, name: str, dest: Path) -> Path | None:
    """Where a member goes inside `dest`; None for members skipped (the root, macOS resource forks)."""
    clean = name.replace("\\", "/")
    parts = PurePosixPath(clean).parts
    if clean.startswith("/") or (len(clean) > 1 and clean[1] == ":") or ".." in parts or "\x00" in clean:
        raise InputError(f"{archive}: member {name!r} is an absolute path or climbs out with '..'; refused")
    if not parts or parts[0] == "__MACOSX":
        return None
    target = dest.joinpath(*parts)
    if not target.resolve().is_relative_to(dest.resolve()):  # belt and braces: nothing we write is a link
        raise InputError(f"{archive}: member {name!r} would land outside the extraction folder; refused")
    return target


def _copy(src, target: Path, budget: _Budget, name: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "xb") as dst:
        while chunk := src.read(1 << 20):
            budget.add(len(chunk), name)
            dst.write(chunk)


def _extract_zip(archive: Path, dest: Path) -> None:
    budget = _Budget(archive)
    with zipfile.ZipFile(archive) as z:
        infos = z.infolist()
        for info in infos:  # everything is checked before the first byte is written
            budget.member(info.filename)
            _member_target(archive, info.filename, dest)
            kind = stat.S_IFMT(info.external_attr >> 16)  # unix file type, when the zip records one
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise InputError(f"{archive}: member {info.filename!r} is a link or special file; only files and folders are allowed")
        if sum(i.file_size for i in infos) > ARCHIVE_MAX_BYTES:
            raise InputError(f"{archive}: more than {ARCHIVE_MAX_BYTES} bytes uncompressed; refused")
        for info in infos:
            target = _member_target(archive, info.filename, dest)
            if target is None:
                continue
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            with z.open(info) as src:
                _copy(src, target, budget, info.filename)


def _extract_tar(archive: Path, dest: Path) -> None:
    budget = _Budget(archive)
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:  # one pass; a refusal discards the (temporary) destination
            budget.member(member.name)
            target = _member_target(archive, member.name, dest)
            if not (member.isfile() or member.isdir()):
                kind = "link" if member.issym() or member.islnk() else "device, FIFO or other special file"
                raise InputError(f"{archive}: member {member.name!r} is a {kind}; only files and folders are allowed")
            if target is None:
                continue
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            src = tar.extractfile(member)
            assert src is not None  # a regular file always has a stream
            with src:
                _copy(src, target, budget, member.name)


def _archive_root(dest: Path) -> Path:
    entries = [p for p in dest.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        inner = entries[0]
        if any(c.is_dir() and not c.name.startswith(".") for c in inner.iterdir()):
            return inner
    return dest
