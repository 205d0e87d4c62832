"""The bad-input matrix: every step, fed a wrong spec or a hostile file, answers with ONE line,
exit code 2, and publishes nothing.

Each case runs through the real CLI (`mnnpipe.cli.main`, in-process) against real files built
once per module: a tiny TorchScript / state-dict / ONNX / .mnn / .pt2 digits CNN, corrupt and
truncated copies, pickles that would run `touch <marker>`, datasets that are empty, mislabelled
or not images, and archives whose members try to escape. A few cases run again as a real
`python -m mnnpipe.cli` process to prove the exit status at process level.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from mnnpipe import data as data_module
from mnnpipe.cli import main
from mnnpipe.data import load_dataset
from mnnpipe.errors import InputError
from mnnpipe.specs import DatasetRef

pytestmark = pytest.mark.integration

DIGITS = {"format": "sklearn-digits", "preprocess": {"channels": "GRAY"}}
GRAY = {"channels": "GRAY"}
SHAPE = [1, 1, 8, 8]


# --------------------------------------------------------------------------- hostile and broken files


class _RunsShell:
    """Unpickling this calls os.system: what a malicious model file does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _replace_zip_member(src: Path, dst: Path, suffix: str, payload: bytes) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            body = payload if info.filename.endswith(suffix) else zin.read(info.filename)
            zout.writestr(info, body)


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _image_tree(root: Path, classes: int, per_class: int) -> None:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / str(c) / f"{i}.png").write_bytes(_png(rng.integers(0, 256, (8, 8), dtype=np.uint8)))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height 8-bit gray pixels and holds one empty data chunk: what a
    decompression bomb looks like to a reader of headers, without building the bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _npz_declaring(path: Path, shape: tuple[int, ...], dtype: str = "<f4") -> None:
    """An .npz whose x.npy header declares `shape` but holds no data (never allocated here)."""
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", buf.getvalue())


def _mnn_variants(root: Path) -> None:
    """Truncated and bit-flipped copies of model.mnn, named corrupt_<how>.mnn."""
    body = (root / "model.mnn").read_bytes()

    def flipped(offset: int) -> bytes:
        out = bytearray(body)
        out[offset] ^= 0xFF
        return bytes(out)

    variants = {
        "cut8": body[:8],  # the root offset and a little more
        "cut_half": body[: len(body) // 2],
        "cut_end20": body[:-20],  # only the last table's tail is missing
        "cut_end1": body[:-1],
        "flip_root": flipped(0),  # the offset of the root table
        "flip_vtable": flipped(4),
        "flip_first_op": flipped(_first_op_offset(body)),  # the first op table's vtable offset
        "flip_conv_param": flipped(_conv_param_offset(body)),  # a conv parameter: MNN loads it, cannot run it
        "flip_conv_loop": flipped(_conv_param_offset(body) + 24),  # another: MNN loads it, then loops ~85 s
    }
    for name, data in variants.items():
        (root / f"corrupt_{name}.mnn").write_bytes(data)


def _first_op_offset(body: bytes) -> int:
    """Where the first op table of the model's `Net.oplists` starts (FlatBuffers: root offset ->
    Net table -> its vtable -> field 3 (oplists) -> vector of offsets to Op tables)."""
    import struct

    def u32(at: int) -> int:
        return struct.unpack_from("<I", body, at)[0]

    net = u32(0)
    vtable = net - struct.unpack_from("<i", body, net)[0]
    field = net + struct.unpack_from("<H", body, vtable + 4 + 2 * 3)[0]
    oplists = field + u32(field)
    return oplists + 4 + u32(oplists + 4)


def _conv_param_offset(body: bytes) -> int:
    """The offset of a byte inside the last convolution's `Convolution2DCommon` table (found as
    the int32 run kernelX=1, kernelY=1, strideX=1, strideY=1, ... of the 1x1 classifier conv):
    flipping a byte makes a dimension ~16 M."""
    run = (b"\x01\x00\x00\x00" * 5)
    at = body.find(run)
    assert at >= 0, "no 1x1 convolution parameters found in model.mnn"
    return at + 2


def _tar_with(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
    with tarfile.open(path, "w:gz" if path.name.endswith("gz") else "w") as tar:
        for info, body in members:
            tar.addfile(info, io.BytesIO(body) if body is not None else None)


def _file_info(name: str, body: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(body)
    return info, body


@dataclass(frozen=True)
class Assets:
    root: Path
    marker: Path  # what the malicious pickles try to create

    def __truediv__(self, name: str) -> str:
        return str(self.root / name)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    from mnnpipe.engines.mnn import convert_onnx_to_mnn
    from mnnpipe.engines.onnx_export import export_onnx
    from mnnpipe.modelio import save_exported
    from mnnpipe.models import digits_cnn

    root = tmp_path_factory.mktemp("bad-inputs")
    a = Assets(root=root, marker=root / "pwned")
    torch.manual_seed(0)
    model = digits_cnn(width=0.25).eval()
    example = torch.rand(*SHAPE)
    torch.jit.trace(model, example).save(a / "model.pt")
    torch.save(model.state_dict(), a / "model.pth")
    export_onnx(model, (example,), a / "model.onnx", input_names=["input"])
    convert_onnx_to_mnn(a / "model.onnx", a / "model.mnn")
    save_exported(model, (example,), root / "model.pt2")

    rng = np.random.default_rng(0)
    for suffix in ("onnx", "pt", "pt2", "pth", "mnn"):
        (root / f"garbage.{suffix}").write_bytes(rng.bytes(4096))
    for name in ("model.pt", "model.onnx"):
        body = (root / name).read_bytes()
        (root / f"truncated{Path(name).suffix}").write_bytes(body[: len(body) // 2])
    (root / "picture.onnx").write_bytes(_png(np.zeros((8, 8), np.uint8)))
    (root / "readme.mnn").write_text("This is not a model, just a README someone renamed.\n")
    (root / "folder.onnx").mkdir()

    # Pickles that would run `touch marker`: a state-dict, a TorchScript data.pkl, a .pt2's example inputs.
    shell = _RunsShell(f"touch {a.marker}")
    torch.save({"weight": shell}, a / "evil.pth")
    _replace_zip_member(root / "model.pt", root / "evil_ts.pt", "/data.pkl", pickle.dumps(shell, protocol=2))
    buf = io.BytesIO()
    torch.save(shell, buf)
    _replace_zip_member(root / "model.pt2", root / "evil.pt2", "sample_inputs/model.pt", buf.getvalue())
    # ...and a .pt2 whose first weight is declared pickled (torch.export.load uses weights_only=False there).
    with zipfile.ZipFile(root / "model.pt2") as z:
        config_name = next(n for n in z.namelist() if n.endswith("weights_config.json"))
        config = json.loads(z.read(config_name))
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    _replace_zip_member(root / "model.pt2", root / "half_evil.pt2", config_name, json.dumps(config).encode())
    _replace_zip_member(root / "half_evil.pt2", root / "evil_weights.pt2", f"weights/{first['path_name']}", buf.getvalue())

    # An ONNX model whose weights point outside its folder (external data).
    import onnx

    proto = onnx.load(a / "model.onnx")
    init = proto.graph.initializer[0]
    n = len(init.raw_data)
    init.ClearField("raw_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "../../../../../../../../etc/passwd"), ("offset", "0"), ("length", str(n))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(proto, a / "ext_escape.onnx")

    # Datasets: npz with too many classes, a short y, an object array, no samples.
    x = rng.integers(0, 256, (60, 8, 8), dtype=np.uint8)
    np.savez(a / "twelve_classes.npz", x=x, y=np.arange(60) % 12)
    np.savez(a / "short_y.npz", x=x[:20], y=np.arange(10) % 10)
    np.savez(a / "objects.npz", x=np.array([{"not": "an array"}] * 4, dtype=object))
    np.savez(a / "empty.npz", x=np.zeros((0, 8, 8), np.uint8), y=np.zeros((0,), np.int64))

    # Image folders: empty, no class folders, a text file inside, an image that is not one, a good one.
    (root / "empty_folder").mkdir()
    (root / "flat_images").mkdir()
    for i in range(3):
        (root / "flat_images" / f"{i}.png").write_bytes(_png(np.zeros((8, 8), np.uint8)))
    _image_tree(root / "with_text", 2, 3)
    (root / "with_text" / "1" / "notes.txt").write_text("labels were checked by hand\n")
    _image_tree(root / "fake_png", 2, 3)
    (root / "fake_png" / "0" / "broken.png").write_text("<html>404 not found</html>")
    _image_tree(root / "good" / "digits", 3, 10)
    _image_tree(root / "bomb_folder", 2, 3)
    (root / "bomb_folder" / "1" / "bomb.png").write_bytes(_png_header_only(20000, 20000))

    # .npz files: a header declaring 64 TiB; labels that are not class indices; a bare .npy; a 0-d x.
    _npz_declaring(root / "huge.npz", (2**44,))
    np.savez(a / "huge_label.npz", x=x[:10], y=np.array([0] * 9 + [10**18], np.int64))
    np.savez(a / "float_labels.npz", x=x[:10], y=np.linspace(0, 1, 10))
    np.save(root / "bare.npy", x[:10])
    (root / "bare_npy.npz").write_bytes((root / "bare.npy").read_bytes())
    np.savez(a / "scalar_x.npz", x=np.array(5, np.uint8))
    np.savez(a / "no_features.npz", x=np.zeros((20, 0), np.float32), y=np.arange(20) % 2)
    (root / "empty_file.npz").write_bytes(b"")
    _mnn_variants(root)

    # Archives: good ones, and ones whose members escape or are not plain files.
    with zipfile.ZipFile(root / "good.zip", "w") as z:
        for p in sorted((root / "good").rglob("*.png")):
            z.write(p, p.relative_to(root / "good").as_posix())
    with tarfile.open(root / "good.tar.gz", "w:gz") as tar:
        tar.add(root / "good" / "digits", arcname="digits")
    png = _png(np.zeros((8, 8), np.uint8))
    with zipfile.ZipFile(root / "traversal.zip", "w") as z:
        z.writestr("0/a.png", png)
        z.writestr("../evil.png", png)
    _tar_with(root / "absolute.tar.gz", [_file_info("0/a.png", png), _file_info(str(root / "evil_abs.png"), png)])
    link = tarfile.TarInfo("0/link.png")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    _tar_with(root / "symlink.tar", [_file_info("0/a.png", png), (link, None)])
    return a


# --------------------------------------------------------------------------- base specs per step


def convert_spec(a: Assets, **over: Any) -> dict:
    return {"model": {"uri": a / "model.pt"}, "inputs": [{"name": "input", "shape": SHAPE}], **over}


def distill_spec(a: Assets, **over: Any) -> dict:
    spec = {
        "teacher": {"uri": a / "model.pt"},
        "student": {"architecture": "digits_cnn", "width": 0.25},
        "dataset": DIGITS,
        "training": {"epochs": 1},
        "cache_teacher_logits": False,
    }
    return {**spec, **over}


def prune_spec(a: Assets, **over: Any) -> dict:
    model = {"uri": a / "model.pth", "factory": "mnnpipe.models:digits_cnn", "factory_kwargs": {"width": 0.25}}
    return {"model": model, "input": {"shape": SHAPE}, **over}


def quantize_spec(a: Assets, **over: Any) -> dict:
    spec = {
        "model": {"uri": a / "model.mnn"},
        "calibration": {**DIGITS, "split": "train", "limit": 20},
        "evaluation": {**DIGITS, "split": "test", "limit": 20},
    }
    return {**spec, **over}


def benchmark_spec(a: Assets, **over: Any) -> dict:
    spec = {"models": [{"label": "m", "model": {"uri": a / "model.pt"}}], "inputs": [{"shape": SHAPE}], "warmup": 0, "iterations": 1}
    return {**spec, **over}


def folder(a: Assets, name: str, **extra: Any) -> dict:
    return {"format": "image-folder", "uri": a / name, "preprocess": GRAY, **extra}


def npz(a: Assets, name: str) -> dict:
    return {"format": "npz", "uri": a / name, "preprocess": GRAY}


def measured(model: dict) -> list[dict]:
    """The benchmark's `models` list with one model labelled 'm'."""
    return [{"label": "m", "model": model}]


def state_dict(uri: str, **kwargs: Any) -> dict:
    return {"uri": uri, "factory": "mnnpipe.models:digits_cnn", "factory_kwargs": {"width": 0.25, **kwargs}}


def yaml_text(spec: dict, extra: str = "") -> str:
    """A spec as YAML text (one JSON line per field, so it stays a block mapping), plus raw lines."""
    return "".join(f"{k}: {json.dumps(v)}\n" for k, v in spec.items()) + extra


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


# "billion laughs": ten names, each a list of ten of the one before: 10**10 values when expanded
ALIAS_BOMB = "l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 10)
)


def bombed_model(a: Assets) -> str:
    """prune's `model` with the alias bomb as factory_kwargs: a field validation does not walk,
    so the spec is valid and whatever walks it afterwards (printing, hashing) never ends."""
    bomb = "".join(f"    {line}\n" for line in ALIAS_BOMB.splitlines())
    return f"model:\n  uri: {json.dumps(a / 'model.pth')}\n  factory: mnnpipe.models:digits_cnn\n  factory_kwargs:\n{bomb}"


HUGE_SAMPLES = [{"name": "input", "shape": [1, 3, 4096, 4096]}]  # 192 MiB each, fine alone
INF = float("inf")

Build = Callable[[Assets], "dict | str"]


def case(step: str, name: str, build: Build, expect: str):
    return pytest.param(step, build, expect, id=f"{step}-{name}")


# one case per line: the matrix reads as a table
# fmt: off
CASES = [
    # ---- convert
    case("convert", "unknown-top-level-key", lambda a: convert_spec(a, opset_version=17), "opset_version"),
    case("convert", "unknown-nested-key", lambda a: convert_spec(a, inputs=[{"name": "input", "shape": SHAPE, "dtyp": "float32"}]), "inputs.0.dtyp"),
    case("convert", "opset-not-a-number", lambda a: convert_spec(a, opset="seventeen"), "opset"),
    case("convert", "tolerance-cosine-above-one", lambda a: convert_spec(a, tolerance={"min_cosine": 1.5}), "tolerance.min_cosine"),
    case("convert", "uri-path-traversal", lambda a: convert_spec(a, model={"uri": "../../etc/passwd"}), "model.uri"),
    case("convert", "uri-unsupported-scheme", lambda a: convert_spec(a, model={"uri": "http://example.com/model.onnx"}), "model.uri"),
    case("convert", "missing-model-file", lambda a: convert_spec(a, model={"uri": a / "missing.pt"}), "missing.pt"),
    case("convert", "model-uri-is-a-folder", lambda a: convert_spec(a, model={"uri": a / "folder.onnx"}), "folder.onnx"),
    case("convert", "random-bytes-onnx", lambda a: convert_spec(a, model={"uri": a / "garbage.onnx"}), "garbage.onnx"),
    case("convert", "random-bytes-pt2", lambda a: convert_spec(a, model={"uri": a / "garbage.pt2"}), "garbage.pt2"),
    case("convert", "png-named-onnx", lambda a: convert_spec(a, model={"uri": a / "picture.onnx"}), "picture.onnx"),
    case("convert", "truncated-onnx", lambda a: convert_spec(a, model={"uri": a / "truncated.onnx"}), "truncated.onnx"),
    case("convert", "truncated-torchscript", lambda a: convert_spec(a, model={"uri": a / "truncated.pt"}), "truncated.pt"),
    case("convert", "onnx-external-data-escapes-folder", lambda a: convert_spec(a, model={"uri": a / "ext_escape.onnx"}), "ext_escape.onnx"),
    case("convert", "torchscript-with-code-running-pickle", lambda a: convert_spec(a, model={"uri": a / "evil_ts.pt"}), "evil_ts.pt"),
    case("convert", "pt2-with-code-running-pickle", lambda a: convert_spec(a, model={"uri": a / "evil.pt2"}), "evil.pt2"),
    case("convert", "declared-channels-do-not-fit", lambda a: convert_spec(a, inputs=[{"name": "input", "shape": [1, 3, 8, 8]}]), "inputs"),
    case("convert", "declared-shape-differs-from-onnx", lambda a: convert_spec(a, model={"uri": a / "model.onnx"}, inputs=[{"name": "input", "shape": [1, 1, 16, 16]}]), "inputs"),
    case("convert", "absurd-declared-shape", lambda a: convert_spec(a, inputs=[{"name": "input", "shape": [1, 3, 100000, 100000]}]), "inputs.0.shape"),
    case("convert", "samples-npz-object-array", lambda a: convert_spec(a, samples=npz(a, "objects.npz")), "objects.npz"),
    # ---- distill
    case("distill", "temperature-zero", lambda a: distill_spec(a, temperature=0), "temperature"),
    case("distill", "alpha-above-one", lambda a: distill_spec(a, alpha=1.5), "alpha"),
    case("distill", "negative-epochs", lambda a: distill_spec(a, training={"epochs": -1}), "training.epochs"),
    case("distill", "epochs-not-a-number", lambda a: distill_spec(a, training={"epochs": "ten"}), "training.epochs"),
    case("distill", "unknown-nested-key", lambda a: distill_spec(a, training={"epochs": 1, "learning_rate": 0.1}), "training.learning_rate"),
    case("distill", "student-two-kinds", lambda a: distill_spec(a, student={"architecture": "digits_cnn", "factory": "mnnpipe.models:digits_cnn"}), "student"),
    case("distill", "teacher-pickle-runs-code", lambda a: distill_spec(a, teacher=state_dict(a / "evil.pth")), "evil.pth"),
    case("distill", "dataset-has-more-classes-than-teacher", lambda a: distill_spec(a, dataset=npz(a, "twelve_classes.npz")), "teacher"),
    case("distill", "missing-dataset-folder", lambda a: distill_spec(a, dataset=folder(a, "no_such_folder")), "no_such_folder"),
    case("distill", "archive-symlink-member", lambda a: distill_spec(a, dataset=folder(a, "symlink.tar")), "link.png"),
    # ---- prune
    case("prune", "ratio-one", lambda a: prune_spec(a, target={"ratio": 1.0}), "target.ratio"),
    case("prune", "unknown-top-level-key", lambda a: prune_spec(a, amount=0.3), "amount"),
    case("prune", "sparsity-not-a-number", lambda a: prune_spec(a, method="unstructured", sparsity="half"), "sparsity"),
    case("prune", "absurd-declared-shape", lambda a: prune_spec(a, input={"shape": [1, 3, 100000, 100000]}), "input.shape"),
    case("prune", "random-bytes-pth", lambda a: prune_spec(a, model=state_dict(a / "garbage.pth")), "garbage.pth"),
    case("prune", "pickle-runs-code", lambda a: prune_spec(a, model=state_dict(a / "evil.pth")), "evil.pth"),
    case("prune", "state-dict-of-another-width", lambda a: prune_spec(a, model=state_dict(a / "model.pth", width=1.0)), "model.pth"),
    case("prune", "declared-channels-do-not-fit", lambda a: prune_spec(a, input={"shape": [1, 3, 8, 8]}), "model: cannot run"),
    case("prune", "eval-folder-with-text-file", lambda a: prune_spec(a, evaluation=folder(a, "with_text")), "notes.txt"),
    case("prune", "empty-calibration-folder", lambda a: prune_spec(a, calibration=folder(a, "empty_folder")), "empty_folder"),
    # ---- quantize
    case("quantize", "admm-activations", lambda a: quantize_spec(a, activation_method="ADMM"), "activation_method"),
    case("quantize", "accuracy-drop-out-of-range", lambda a: quantize_spec(a, max_accuracy_drop=101), "max_accuracy_drop"),
    case("quantize", "full-int8-without-calibration", lambda a: {k: v for k, v in quantize_spec(a).items() if k != "calibration"}, "calibration"),
    case("quantize", "negative-calibration-samples", lambda a: quantize_spec(a, calibration_samples=-5), "calibration_samples"),
    case("quantize", "random-bytes-mnn", lambda a: quantize_spec(a, model={"uri": a / "garbage.mnn"}), "garbage.mnn"),
    case("quantize", "text-named-mnn", lambda a: quantize_spec(a, model={"uri": a / "readme.mnn"}), "readme.mnn"),
    case("quantize", "evaluation-archive-path-traversal", lambda a: quantize_spec(a, evaluation=folder(a, "traversal.zip")), "../evil.png"),
    case("quantize", "evaluation-folder-without-class-folders", lambda a: quantize_spec(a, evaluation=folder(a, "flat_images")), "flat_images"),
    case("quantize", "evaluation-images-of-wrong-size", lambda a: quantize_spec(a, evaluation={**DIGITS, "preprocess": {**GRAY, "size": [16, 16]}}), "evaluation"),
    case("quantize", "empty-calibration-npz", lambda a: quantize_spec(a, calibration=npz(a, "empty.npz")), "empty.npz"),
    case("quantize", "evaluation-image-that-is-html", lambda a: quantize_spec(a, evaluation=folder(a, "fake_png")), "broken.png"),
    # ---- benchmark
    case("benchmark", "iterations-zero", lambda a: benchmark_spec(a, iterations=0), "iterations"),
    case("benchmark", "threads-not-numbers", lambda a: benchmark_spec(a, threads="two"), "threads"),
    case("benchmark", "absurd-batch-size", lambda a: benchmark_spec(a, batch_sizes=[100000]), "batch_sizes"),
    case("benchmark", "label-with-slash", lambda a: benchmark_spec(a, models=[{"label": "../m", "model": {"uri": a / "model.pt"}}]), "models.0.label"),
    case("benchmark", "missing-model-file", lambda a: benchmark_spec(a, models=measured({"uri": a / "missing.onnx"})), "missing.onnx"),
    case("benchmark", "random-bytes-mnn", lambda a: benchmark_spec(a, models=measured({"uri": a / "garbage.mnn"})), "garbage.mnn"),
    case("benchmark", "state-dict-pickle-runs-code", lambda a: benchmark_spec(a, models=measured(state_dict(a / "evil.pth"))), "evil.pth"),
    case("benchmark", "pt2-with-pickled-weight", lambda a: benchmark_spec(a, models=measured({"uri": a / "evil_weights.pt2"})), "evil_weights.pt2"),
    case("benchmark", "dataset-archive-absolute-member", lambda a: benchmark_spec(a, inputs=[], dataset=folder(a, "absolute.tar.gz")), "evil_abs.png"),
    case("benchmark", "dataset-y-length-mismatch", lambda a: benchmark_spec(a, inputs=[], dataset=npz(a, "short_y.npz")), "short_y.npz"),
    case("benchmark", "declared-shape-differs-from-dataset", lambda a: benchmark_spec(a, inputs=[{"shape": [1, 3, 8, 8]}], dataset=DIGITS), "inputs"),
    # ---- issue 13 item 7: hostile sizes, depths, aliases and numbers
    case("distill", "image-decompression-bomb", lambda a: distill_spec(a, dataset=folder(a, "bomb_folder")), "bomb.png"),
    case("benchmark", "npz-header-declares-64-tib", lambda a: benchmark_spec(a, inputs=[], dataset=npz(a, "huge.npz")), "huge.npz"),
    case("benchmark", "npz-label-not-a-class-index", lambda a: benchmark_spec(a, inputs=[], dataset=npz(a, "huge_label.npz")), "huge_label.npz"),
    case("prune", "npz-float-labels", lambda a: prune_spec(a, evaluation=npz(a, "float_labels.npz")), "float_labels.npz"),
    case("quantize", "npz-that-is-a-bare-npy", lambda a: quantize_spec(a, evaluation=npz(a, "bare_npy.npz")), "bare_npy.npz"),
    case("quantize", "npz-with-0d-x", lambda a: quantize_spec(a, calibration=npz(a, "scalar_x.npz")), "scalar_x.npz"),
    case("distill", "empty-npz-file", lambda a: distill_spec(a, dataset=npz(a, "empty_file.npz")), "empty_file.npz"),
    case("convert", "spec-nested-50000-deep", lambda a: yaml_text(convert_spec(a), f"tolerance: {deep(50_000)}\n"), "nested deeper than 64"),
    case("prune", "spec-yaml-alias-bomb", lambda a: yaml_text({k: v for k, v in prune_spec(a).items() if k != "model"}, bombed_model(a)), "aliases"),
    case("prune", "spec-yaml-recursive-alias", lambda a: yaml_text(prune_spec(a), "loop: &loop [*loop]\n"), "recursive"),
    case("distill", "spec-int-of-5000-digits", lambda a: yaml_text(distill_spec(a), f"seed: {'1' * 5000}\n"), "a value cannot be read"),
    case("distill", "spec-over-1-mib", lambda a: yaml_text(distill_spec(a), f"notes: {'x' * (1 << 20)}\n"), "1048576 characters"),
    case("convert", "input-range-infinite", lambda a: convert_spec(a, inputs=[{"name": "input", "shape": SHAPE, "range": [-INF, INF]}]), "inputs.0.range.0: Input should be a finite number"),
    case("quantize", "preprocess-mean-nan", lambda a: quantize_spec(a, evaluation={**DIGITS, "preprocess": {**GRAY, "mean": [float("nan")]}}), "evaluation.preprocess.mean.0"),
    case("benchmark", "preprocess-std-nan", lambda a: benchmark_spec(a, inputs=[], dataset={**DIGITS, "preprocess": {**GRAY, "std": [float("nan")]}}), "dataset.preprocess.std.0"),
    case("convert", "samples-need-256-gib", lambda a: convert_spec(a, inputs=HUGE_SAMPLES, num_samples=1366), "num_samples (1366) x inputs"),
    case("benchmark", "timing-inputs-need-768-gib", lambda a: benchmark_spec(a, inputs=HUGE_SAMPLES, batch_sizes=[4096]), "batch_sizes (sum 4096) x inputs"),
    case("benchmark", "fidelity-inputs-need-1-tib", lambda a: benchmark_spec(a, inputs=HUGE_SAMPLES, reference="m", num_samples=6000), "num_samples (6000) x inputs"),
    case("benchmark", "int-range-does-not-fit-dtype", lambda a: benchmark_spec(a, inputs=[{"shape": SHAPE, "dtype": "int64", "range": [-1e30, 1e30]}], reference="m"), "inputs.0: range"),
    case("distill", "seed-beyond-64-bits", lambda a: distill_spec(a, seed=2**64), "seed"),
    case("benchmark", "npz-samples-without-features", lambda a: benchmark_spec(a, inputs=[], dataset=npz(a, "no_features.npz")), "no_features.npz"),
    case("benchmark", "dataset-resized-to-450-gib", lambda a: benchmark_spec(a, inputs=[], dataset={**DIGITS, "preprocess": {**GRAY, "size": [8192, 8192]}}), "need 449.2 GiB"),
    *[
        case("quantize", f"mnn-{name}", lambda a, name=name: quantize_spec(a, model={"uri": a / f"corrupt_{name}.mnn"}, timeout_s=5), f"corrupt_{name}.mnn: not a loadable .mnn model")
        for name in ("cut8", "cut_half", "cut_end20", "cut_end1", "flip_root", "flip_vtable", "flip_first_op", "flip_conv_param", "flip_conv_loop")
    ],
]
# fmt: on


# --------------------------------------------------------------------------- the checks


@pytest.fixture(autouse=True)
def _restore_logging():
    """main() installs its own handler on the 'mnnpipe' logger; put the old ones back afterwards."""
    logger = logging.getLogger("mnnpipe")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


def write_spec(tmp_path: Path, build: Build, assets: Assets) -> tuple[Path, Path]:
    out = tmp_path / "out"
    spec = build(assets)
    if isinstance(spec, str):  # YAML text: what a dict cannot hold (aliases, depth, size)
        path = tmp_path / "spec.yaml"
        path.write_text(f"output: {json.dumps(str(out))}\n{spec}")
        return path, out
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({**spec, "output": str(out)}))
    return path, out


def published_files(out: Path) -> list[str]:
    """Everything a failed run left under its output prefix (manifest, result, models, lock)."""
    if not out.exists():
        return []
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if not p.is_dir())


def test_matrix_covers_every_step_with_at_least_four_cases():
    steps = [p.values[0] for p in CASES]

    assert len(CASES) >= 35
    assert len(SUBPROCESS_CASES) == 4
    assert {s: steps.count(s) >= 4 for s in ("convert", "distill", "prune", "quantize", "benchmark")} == dict.fromkeys(
        ("convert", "distill", "prune", "quantize", "benchmark"), True
    )


@pytest.mark.parametrize("step, build, expect", CASES)
def test_bad_input_gives_one_line_exit_2_and_publishes_nothing(step, build, expect, assets, tmp_path, cache_dir, capsys):
    assets.marker.unlink(missing_ok=True)  # a case that did run code must not fail the ones after it
    spec_path, out = write_spec(tmp_path, build, assets)

    code = main(["-q", "run", step, "--spec", str(spec_path)])

    stdout, stderr = capsys.readouterr()
    lines = stderr.splitlines()
    assert code == 2, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    assert expect in lines[0]
    assert "Traceback" not in stderr
    assert stdout == ""
    assert published_files(out) == []
    assert not assets.marker.exists(), "a model file ran code while being loaded"


SUBPROCESS_CASES = [
    p for p in CASES if p.id in {
        "convert-pt2-with-code-running-pickle", "distill-teacher-pickle-runs-code", "prune-ratio-one",
        "benchmark-missing-model-file",
    }
]  # fmt: skip


@pytest.mark.parametrize("step, build, expect", SUBPROCESS_CASES)
def test_process_exit_status_is_2(step, build, expect, assets, tmp_path, cache_dir):
    assets.marker.unlink(missing_ok=True)
    spec_path, out = write_spec(tmp_path, build, assets)

    proc = subprocess.run(
        [sys.executable, "-m", "mnnpipe.cli", "-q", "run", step, "--spec", str(spec_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip

    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], proc.stderr
    assert proc.stdout == ""
    assert published_files(out) == []
    assert not assets.marker.exists()


# --------------------------------------------------------------------------- limits `validate` checks too

SPEC_LEVEL_CASES = [
    p for p in CASES if p.id.split("-", 1)[1] in {
        "spec-nested-50000-deep", "spec-yaml-alias-bomb", "spec-yaml-recursive-alias", "spec-over-1-mib", "spec-int-of-5000-digits",
        "input-range-infinite", "preprocess-mean-nan", "preprocess-std-nan", "samples-need-256-gib",
        "timing-inputs-need-768-gib", "fidelity-inputs-need-1-tib", "int-range-does-not-fit-dtype", "seed-beyond-64-bits",
    }
]  # fmt: skip


@pytest.mark.parametrize("step, build, expect", SPEC_LEVEL_CASES)
def test_validate_refuses_what_run_refuses_at_spec_level(step, build, expect, assets, tmp_path, capsys):
    spec_path, _ = write_spec(tmp_path, build, assets)

    code = main(["validate", step, "--spec", str(spec_path)])

    stdout, stderr = capsys.readouterr()
    assert code == 2, stderr
    assert stderr.splitlines() == [stderr.strip()] and stderr.startswith("error: ") and expect in stderr, stderr
    assert stdout == ""


HANG_CASES = [p for p in CASES if p.id in {"prune-spec-yaml-alias-bomb", "convert-spec-nested-50000-deep"}]


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("step, build, expect", HANG_CASES)
def test_hostile_spec_text_is_refused_promptly_by_a_real_process(command, step, build, expect, assets, tmp_path, cache_dir):
    spec_path, out = write_spec(tmp_path, build, assets)

    proc = subprocess.run(
        [sys.executable, "-m", "mnnpipe.cli", "-q", command, step, "--spec", str(spec_path)],
        capture_output=True, text=True, timeout=60,  # the alias bomb hung both commands for good
    )  # fmt: skip

    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and expect in proc.stderr, proc.stderr
    assert published_files(out) == []


def test_an_anchor_shared_by_two_fields_is_still_a_valid_spec(assets, tmp_path, capsys):
    spec = yaml_text({k: v for k, v in quantize_spec(assets).items() if k not in ("calibration", "evaluation")})
    spec += "calibration: &digits {format: sklearn-digits, preprocess: {channels: GRAY}, limit: 20}\nevaluation: *digits\n"
    spec_path, _ = write_spec(tmp_path, lambda a: spec, assets)

    code = main(["validate", "quantize", "--spec", str(spec_path)])

    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert json.loads(stdout)["evaluation"]["limit"] == 20


# --------------------------------------------------------------------------- archives


@pytest.mark.parametrize("name", ["good.zip", "good.tar.gz"])
def test_image_folder_archive_loads_and_leaves_nothing_beside_it(name, assets, tmp_path):
    archive = tmp_path / name
    archive.write_bytes((assets.root / name).read_bytes())
    ref = DatasetRef(format="image-folder", uri=str(archive), preprocess=GRAY)

    ds = load_dataset(ref, archive)

    assert ds.classes == ("0", "1", "2")  # descended into the single top-level folder 'digits/'
    assert len(ds) == 30 and ds.x.shape == (30, 1, 8, 8)
    assert np.bincount(ds.y).tolist() == [10, 10, 10]
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_bad_file_inside_an_archive_is_named_by_archive_and_member(tmp_path):
    archive = tmp_path / "labelled.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("set/0/a.png", _png(np.zeros((8, 8), np.uint8)))
        z.writestr("set/1/notes.txt", "not an image")
    ref = DatasetRef(format="image-folder", uri=str(archive), preprocess=GRAY)

    with pytest.raises(InputError) as err:
        load_dataset(ref, archive)

    assert str(err.value).startswith(f"{archive}!/set/1/notes.txt: not an image")


def test_archive_over_the_member_limit_is_refused(assets, monkeypatch):
    monkeypatch.setattr(data_module, "ARCHIVE_MAX_MEMBERS", 5)
    ref = DatasetRef(format="image-folder", uri=assets / "good.zip", preprocess=GRAY)

    with pytest.raises(InputError, match=r"good\.zip.*more than 5 members"):
        load_dataset(ref, assets.root / "good.zip")


def test_archive_over_the_size_limit_is_refused(assets, monkeypatch):
    monkeypatch.setattr(data_module, "ARCHIVE_MAX_BYTES", 1000)
    ref = DatasetRef(format="image-folder", uri=assets / "good.tar.gz", preprocess=GRAY)

    with pytest.raises(InputError, match=r"good\.tar\.gz.*1000 bytes"):
        load_dataset(ref, assets.root / "good.tar.gz")


def test_zip_symlink_member_is_refused(assets, tmp_path):
    archive = tmp_path / "zip_link.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("0/a.png", _png(np.zeros((8, 8), np.uint8)))
        info = zipfile.ZipInfo("0/link.png")
        info.external_attr = (0o120777 << 16)  # S_IFLNK: a symbolic link, as `zip --symlinks` stores it
        z.writestr(info, "/etc/passwd")
    ref = DatasetRef(format="image-folder", uri=str(archive), preprocess=GRAY)

    with pytest.raises(InputError, match=r"zip_link\.zip.*0/link\.png"):
        load_dataset(ref, archive)


def test_tar_device_member_is_refused(tmp_path):
    archive = tmp_path / "device.tar"
    dev = tarfile.TarInfo("0/null.png")
    dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 3
    _tar_with(archive, [(dev, None)])
    ref = DatasetRef(format="image-folder", uri=str(archive), preprocess=GRAY)

    with pytest.raises(InputError, match=r"device\.tar.*0/null\.png"):
        load_dataset(ref, archive)


# --------------------------------------------------------------------------- untrusted torch files


def test_a_plain_pt2_still_loads_and_the_safety_switch_is_put_back(assets, monkeypatch):
    from mnnpipe.modelio import load_torch
    from mnnpipe.specs import ModelRef

    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    x = torch.rand(*SHAPE)
    reference = torch.jit.load(assets / "model.pt")(x)

    model = load_torch(ModelRef(uri=assets / "model.pt2"), assets.root / "model.pt2")

    torch.testing.assert_close(model(x), reference)
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_pt2_with_a_pickled_weight_is_refused_before_torch_reads_it(assets):
    from mnnpipe.modelio import load_torch
    from mnnpipe.specs import ModelRef

    assets.marker.unlink(missing_ok=True)

    with pytest.raises(InputError, match=r"half_evil\.pt2: '.+' is stored as a pickled object"):
        load_torch(ModelRef(uri=assets / "half_evil.pt2"), assets.root / "half_evil.pt2")
    assert not assets.marker.exists()
