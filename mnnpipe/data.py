"""Datasets: an image folder (one sub-folder per class), `.npz` arrays, or scikit-learn's digits.

Whatever the source, a dataset becomes `Dataset(x, y, classes, raw)`: `x` float32 in the model's
layout after preprocessing (npz arrays that are not images are kept as stored: float N-D tensors
as float32, integer token ids unchanged), `y` int64 labels (or None), and `raw` the uint8 HWC
images before normalisation (what MNN's calibration tool reads), when the samples are images.
"""

from __future__ import annotations

import stat
import tarfile
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import numpy as np

from .errors import InputError
from .specs import DatasetRef, Preprocess

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".webp"}
SPLIT_FRACTIONS = {"test": 0.2, "val": 0.1}
_SPLIT_SEED = 0  # fixed, so every step of a pipeline sees the same train/val/test partition
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
ARCHIVE_MAX_MEMBERS = 1_000_000  # more entries than any image dataset we load into memory
ARCHIVE_MAX_BYTES = 16 * 2**30  # uncompressed; a zip bomb stops here, not when the disk is full
# Checked on the header, before any pixel or array is decoded: a 20000x20000 PNG is a few KB on
# disk, an .npz member can declare 64 TiB in its 128-byte header.
IMAGE_MAX_PIXELS = 8192 * 8192  # the largest preprocess.size accepts
NPZ_MAX_BYTES = ARCHIVE_MAX_BYTES  # per array, as declared by its header
MAX_CLASSES = 100_000  # labels in 'y' are class indices, not arbitrary numbers
DATASET_MAX_BYTES = 16 * 2**30  # the float32 samples a dataset becomes, checked before resizing


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
    _check_memory(raw.shape, ref.preprocess, ref.uri or ref.format)
    if _is_tensor_data(raw):  # model inputs as stored: float N-D tensors, sequences, token ids
        if ref.preprocess != Preprocess():
            raise InputError(
                f"{ref.uri or ref.format}: preprocess applies to uint8 images and 2-D float features; these {raw.dtype} "
                f"samples of shape {list(raw.shape[1:])} are fed to the model as stored: remove preprocess"
            )
        return Dataset(raw if raw.dtype.kind in "iu" else raw.astype(np.float32), y, classes, None)
    if raw.ndim == 2:  # (N, features): only scale/mean/std apply
        p = ref.preprocess
        x = ((raw.astype(np.float32) / p.scale) - p.mean[0]) / p.std[0]
        return Dataset(x.astype(np.float32), y, classes, None)
    images = _resize_and_convert(raw, ref.preprocess, ref.uri or ref.format)
    return Dataset(normalize(images, ref.preprocess), y, classes, images)


def _is_tensor_data(raw: np.ndarray) -> bool:
    """Samples that are not images: integers other than uint8 (token ids stay integers: a float
    cast breaks an int64 input), and float arrays of rank 3 or more (NCHW tensors, sequences)."""
    if raw.dtype.kind in "iu":
        return raw.dtype != np.uint8
    return raw.dtype.kind == "f" and raw.ndim >= 3


def _check_memory(raw_shape: tuple[int, ...], p: Preprocess, label: str) -> None:
    """Refuse before resizing when the float32 samples would exceed DATASET_MAX_BYTES (1797 digits
    resized to preprocess.size 8192x8192 would need 450 GiB)."""
    n, sample = raw_shape[0], list(raw_shape[1:])
    if len(sample) >= 2 and p.size is not None:
        sample = [*p.size, 1 if p.channels == "GRAY" else 3]
    need = 4 * n * int(np.prod(sample, dtype=np.float64))
    if need > DATASET_MAX_BYTES:
        raise InputError(
            f"{label}: {n} samples of shape {sample} need {need / 2**30:.1f} GiB as float32; at most "
            f"{DATASET_MAX_BYTES / 2**30:g} GiB (set limit or split, or a smaller preprocess.size)"
        )


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
                arr = _read_image(path, mode, p.size)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise InputError(f"{path}: image has more pixels than PIL reads safely; at most {IMAGE_MAX_PIXELS}") from None
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:  # PIL raises SyntaxError for some corrupt headers
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


def _read_image(path: Path, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    """Decode one image file, refusing more than IMAGE_MAX_PIXELS before any pixel is decoded."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL's own, looser, cap
        with Image.open(path) as im:
            if im.width * im.height > IMAGE_MAX_PIXELS:
                raise InputError(f"{path}: image of {im.width}x{im.height} pixels; at most {IMAGE_MAX_PIXELS} pixels are read")
            im = im.convert(mode)
            if size is not None:
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)


def _read_npz(path: Path, pick: Callable[[Any], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays `pick` reads from the open .npz (it raises InputError for missing ones), after
    checking that `path` is a zip of .npy arrays none of which declares more than NPZ_MAX_BYTES.
    Never unpickles: an .npz may be untrusted."""
    if not zipfile.is_zipfile(path):  # np.load would read a bare .npy or a pickle as something else
        raise InputError(f"{path}: not a .npz archive (expected a zip of .npy arrays, as numpy.savez writes)")
    try:
        _check_npz_headers(path)
        with np.load(path, allow_pickle=False) as f:
            return pick(f)
    except InputError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: not a readable .npz archive ({type(e).__name__}: {str(e)[:80]})") from None


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...]]:
    def pick(f: Any) -> dict[str, np.ndarray]:
        if "x" not in f:
            raise InputError(f"{path}: .npz must contain an array named 'x' (and optionally 'y')")
        return {"x": f["x"], **({"y": f["y"]} if "y" in f else {})}

    arrays = _read_npz(path, pick)
    x, y = arrays["x"], arrays.get("y")
    if x.ndim < 2:
        raise InputError(f"{path}: 'x' must hold samples (N, ...) with at least 2 dimensions, got shape {list(x.shape)}")
    if 0 in x.shape[1:]:
        raise InputError(f"{path}: 'x' samples are empty (shape {list(x.shape)})")
    if x.dtype.kind not in "biuf":
        raise InputError(f"{path}: 'x' must hold numbers, got dtype {x.dtype}")
    if y is not None:
        y = _labels(path, y, len(x))
    n_classes = int(y.max()) + 1 if y is not None and len(y) else 0
    return x, y, tuple(str(i) for i in range(n_classes))


def load_named_samples(ref: DatasetRef, local: Path | None, inputs: list) -> list[list[np.ndarray]]:
    """Samples for a model with several inputs, from an .npz holding one array per input name.

    Array `name` holds (N * batch, *shape[1:]) values of the input `name` (a TensorSpec); rows are
    grouped by the input's batch size and cast to its dtype (int64 token ids stay integers). The
    split and limit apply to samples; preprocessing does not (the arrays are model inputs already).
    """
    label = ref.uri or ref.format
    if ref.format != "npz" or local is None:
        raise InputError(f"{label}: a multi-input model reads its samples from an npz with one array per input name, not '{ref.format}'")
    if ref.preprocess != Preprocess():
        raise InputError(f"{label}: preprocess does not apply to per-input npz arrays (they are fed as stored); remove it")

    def pick(f: Any) -> dict[str, np.ndarray]:
        missing = [t.name for t in inputs if t.name not in f]
        if missing:
            raise InputError(f"{local}: no array for input(s) {missing}; it has {sorted(f.files)} (one array per input name)")
        return {t.name: f[t.name] for t in inputs}

    arrays = _read_npz(local, pick)
    counts = set()
    for t in inputs:
        a, batch = arrays[t.name], t.shape[0]
        if a.dtype.kind not in "biuf" or tuple(a.shape[1:]) != tuple(t.shape[1:]) or len(a) % batch:
            raise InputError(
                f"{local}: array '{t.name}' has shape {list(a.shape)} of {a.dtype}; input '{t.name}' needs numbers of "
                f"shape [N * {batch}, {', '.join(map(str, t.shape[1:]))}]"
            )
        if np.dtype(t.dtype).kind in "iu" and a.dtype.kind == "f" and not np.all(a == np.round(a)):
            raise InputError(f"{local}: array '{t.name}' holds fractions; input '{t.name}' takes {t.dtype} (e.g. token ids)")
        counts.add(len(a) // batch)
    if len(counts) != 1:
        raise InputError(f"{local}: the input arrays hold different sample counts {sorted(counts)}; one sample has every input")
    idx = split_indices(counts.pop(), None, ref.split)[: ref.limit]
    if len(idx) == 0:
        raise InputError(f"{label}: split '{ref.split}' is empty")
    return [
        [arrays[t.name][i * t.shape[0] : (i + 1) * t.shape[0]].astype(t.dtype).reshape(t.shape) for t in inputs] for i in idx
    ]


def _labels(path: Path, y: np.ndarray, n: int) -> np.ndarray:
    """'y' as int64 class indices, one per sample, in [0, MAX_CLASSES)."""
    if y.ndim != 1 or len(y) != n:
        raise InputError(f"{path}: 'y' must be 1-D with one label per sample ({n}), got shape {list(y.shape)}")
    if y.dtype.kind not in "biuf" or (y.dtype.kind == "f" and not np.all(np.isfinite(y) & (y == np.round(y)))):
        raise InputError(f"{path}: labels in 'y' must be whole numbers (class indices), got dtype {y.dtype}")
    if len(y) and (y.min() < 0 or y.max() >= MAX_CLASSES):
        raise InputError(f"{path}: labels in 'y' must be class indices in [0, {MAX_CLASSES}), got [{y.min()}, {y.max()}]")
    return y.astype(np.int64)


def _check_npz_headers(path: Path) -> None:
    """Refuse an array whose .npy header declares more than NPZ_MAX_BYTES, before numpy allocates it.
    Raises what zipfile and numpy raise for unreadable archives (_read_npz turns them into InputError)."""
    from numpy.lib import format as npy

    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with z.open(info) as f:
                version = npy.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = npy.read_array_header_1_0(f)
                else:
                    shape, _, dtype = npy.read_array_header_2_0(f)
            n = dtype.itemsize
            for d in shape:
                n *= d
            if n > NPZ_MAX_BYTES:
                raise InputError(
                    f"{path}: array '{info.filename[:-4]}' declares shape {list(shape)} of {dtype} "
                    f"({n / 2**30:.1f} GiB); at most {NPZ_MAX_BYTES / 2**30:g} GiB per array"
                )


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


def _place(target: Path | None, is_dir: bool, open_member: Callable[[], Any], budget: _Budget, name: str) -> None:
    """Create one checked member at `target` (None: skipped): a folder, or a file copied from
    `open_member()` within the budget."""
    if target is None:
        return
    if is_dir:
        target.mkdir(parents=True, exist_ok=True)
        return
    src = open_member()
    assert src is not None  # a regular file always has a stream
    with src:
        _copy(src, target, budget, name)


def check_zip_declared(
    archive: Path | str,
    infos: list[zipfile.ZipInfo],
    *,
    max_bytes: int = ARCHIVE_MAX_BYTES,
    max_members: int = ARCHIVE_MAX_MEMBERS,
    max_ratio: float | None = None,
) -> None:
    """Refuse a zip by what its central directory declares, before any member is inflated: more
    than `max_members` entries, more than `max_bytes` uncompressed in all, or (with `max_ratio`)
    a member over 1 MiB that inflates more than `max_ratio` times (a zip bomb). Readers such as
    torch's allocate what the directory declares, so this is the size that matters for memory."""
    if len(infos) > max_members:
        raise InputError(f"{archive}: more than {max_members} members; refused")
    total = sum(i.file_size for i in infos)
    if total > max_bytes:
        raise InputError(f"{archive}: {total} bytes uncompressed, more than the limit of {max_bytes}; refused")
    if max_ratio is not None:
        for i in infos:
            if i.file_size > 2**20 and i.file_size > max_ratio * max(i.compress_size, 1):
                raise InputError(
                    f"{archive}: member {i.filename!r} inflates {i.compress_size} -> {i.file_size} bytes "
                    f"(more than {max_ratio:g}x); refused as a zip bomb"
                )


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
        check_zip_declared(archive, infos)
        for info in infos:
            target = _member_target(archive, info.filename, dest)
            _place(target, info.is_dir(), lambda info=info: z.open(info), budget, info.filename)


def _extract_tar(archive: Path, dest: Path) -> None:
    budget = _Budget(archive)
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:  # one pass; a refusal discards the (temporary) destination
            budget.member(member.name)
            target = _member_target(archive, member.name, dest)
            if not (member.isfile() or member.isdir()):
                kind = "link" if member.issym() or member.islnk() else "device, FIFO or other special file"
                raise InputError(f"{archive}: member {member.name!r} is a {kind}; only files and folders are allowed")
            _place(target, member.isdir(), lambda member=member: tar.extractfile(member), budget, member.name)


def _archive_root(dest: Path) -> Path:
    entries = [p for p in dest.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        inner = entries[0]
        if any(c.is_dir() and not c.name.startswith(".") for c in inner.iterdir()):
            return inner
    return dest
