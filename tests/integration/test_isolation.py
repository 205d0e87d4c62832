"""Isolation (issue 13 items 1-2): model files cannot reach the host (size cap, graph allowlist,
confined processes) and MNN tools never share a cwd."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration


def _weights_digest(mnn: Path) -> str:
    """sha256 over every weight and bias stored in the .mnn, read from MNN's own JSON dump (the
    file's bytes also hold a random `mnn_uuid`, so they differ between identical conversions)."""
    from mnnpipe.engines.mnn import _run_tool

    dump = mnn.with_suffix(".weights.json").absolute()
    _run_tool("mnnconvert", ["-f", "MNN", "--modelFile", str(mnn.absolute()), "--JsonFile", str(dump)], output=dump, timeout_s=300)
    net = json.loads(dump.read_text())
    h = hashlib.sha256()
    for op in net["oplists"]:
        main = op.get("main") if isinstance(op.get("main"), dict) else {}
        for key in ("weight", "bias", "float32s"):
            if key in main:
                h.update(np.asarray(main[key], np.float32).tobytes())
    return h.hexdigest()


def _twin_onnx_models(root: Path) -> list[Path]:
    """Two ONNX MLPs that differ only by 1e-6 noise on their weights (~10 MB each: the converter
    spills weights through `.__convert_external_data.bin` in its cwd)."""
    from mnnpipe.engines.onnx_export import export_onnx

    torch.manual_seed(0)
    # MatMul weights are what the converter writes to that file and reads back (strace: convs are not)
    base = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(192, 1536), torch.nn.ReLU(), torch.nn.Linear(1536, 1536), torch.nn.ReLU(), torch.nn.Linear(1536, 10)
    ).eval()
    paths = []
    for i in range(2):
        model = copy.deepcopy(base)
        if i:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 1e-6)
        path = root / f"twin{i}.onnx"
        export_onnx(model.eval(), (torch.rand(1, 3, 8, 8),), path, input_names=["input"])
        paths.append(path)
    return paths


# Each process waits for the `go` file, so the four conversions really overlap (a race test that
# only sometimes races proves nothing).
_CONVERT_AFTER_BARRIER = """
import sys, time
from pathlib import Path
from mnnpipe.engines.mnn import convert_onnx_to_mnn
go, src, dst = sys.argv[1:]
while not Path(go).exists():
    time.sleep(0.01)
convert_onnx_to_mnn(src, dst)
"""


def test_concurrent_converts_from_one_cwd_each_publish_their_own_weights(tmp_path):
    from mnnpipe.engines.mnn import convert_onnx_to_mnn

    models = _twin_onnx_models(tmp_path)
    alone = []  # what each model converts to on its own
    for i, src in enumerate(models):
        convert_onnx_to_mnn(src, tmp_path / f"alone{i}.mnn")
        alone.append(_weights_digest(tmp_path / f"alone{i}.mnn"))
    assert alone[0] != alone[1]

    shared_cwd = tmp_path / "cwd"
    shared_cwd.mkdir()
    go = tmp_path / "go"
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONVERT_AFTER_BARRIER, str(go), str(models[k % 2]), str(tmp_path / f"out{k}.mnn")],
            cwd=shared_cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for k in range(4)
    ]
    time.sleep(1.5)  # let every process import before the start
    go.touch()
    for proc in runs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-2000:]
    for k in range(4):
        assert _weights_digest(tmp_path / f"out{k}.mnn") == alone[k % 2], f"convert {k} wrote the other model's weights"
    assert not list(shared_cwd.iterdir())  # nothing of the tools' scratch lands in the caller's cwd


# --------------------------------------------------------------------------- item 1: graph allowlist


class _WritesAFile(torch.nn.Module):
    """forward maps a host file with torch.from_file and writes into it."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.from_file(self.target, True, 16)
        t.copy_(torch.ones(16))
        return x + t[0] * 0  # the result depends on the file, so the compiler keeps the write


class _Nested(torch.nn.Module):
    def __init__(self, target: str) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        self.head = torch.nn.ModuleDict({"inner": _WritesAFile(target)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head["inner"](self.features(x))


def _hostile(tmp_path: Path, nested: bool) -> tuple[Path, Path]:
    target = tmp_path / "written-by-the-model"
    model = _Nested(str(target)) if nested else _WritesAFile(str(target))
    path = tmp_path / ("nested.pt" if nested else "flat.pt")
    torch.jit.script(model).save(str(path))
    assert not target.exists()
    return path, target


def _run_cli(tmp_path: Path, step: str, spec: dict) -> subprocess.CompletedProcess:
    spec_path = tmp_path / f"{step}-spec.json"
    spec_path.write_text(json.dumps(spec))
    return subprocess.run(
        [sys.executable, "-m", "mnnpipe.cli", "--quiet", "run", step, "--spec", str(spec_path), "--no-cache"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested-submodule"])
@pytest.mark.parametrize("step", ["convert", "benchmark"])
def test_a_model_that_writes_a_file_is_refused_before_it_runs(tmp_path, cache_dir, step, nested):
    path, target = _hostile(tmp_path, nested)
    inputs = [{"name": "input", "shape": [1, 4]}]
    if step == "convert":
        spec = {"model": {"uri": str(path)}, "inputs": inputs, "output": str(tmp_path / "out")}
    else:
        spec = {"models": [{"label": "m", "model": {"uri": str(path)}}], "inputs": inputs, "output": str(tmp_path / "out"), "iterations": 1, "warmup": 0}

    proc = _run_cli(tmp_path, step, spec)

    assert proc.returncode == 2, proc.stderr
    assert "aten::from_file" in proc.stderr and str(path) in proc.stderr
    assert not target.exists()
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_reference_architectures_pass_the_allowlist(tmp_path):
    from mnnpipe import models
    from mnnpipe.modelio import load_torch, save_exported, save_torchscript
    from mnnpipe.specs import ModelRef

    cases = {
        "digits": (models.digits_cnn(), (torch.rand(1, 1, 8, 8),)),
        "mobilenet_v2": (models.mobilenet_v2(num_classes=10, width=0.25), (torch.rand(1, 3, 32, 32),)),
        "resnet18": (models.resnet18(num_classes=10, width=0.25), (torch.rand(1, 3, 32, 32),)),
        "text_encoder": (models.text_encoder(), (torch.randint(0, 100, (1, 8)), torch.ones(1, 8, dtype=torch.long))),
    }
    for name, (model, example) in cases.items():
        model.eval()
        files = {
            tmp_path / f"{name}.traced.pt": lambda p: save_torchscript(model, example, p),
            tmp_path / f"{name}.scripted.pt": lambda p: torch.jit.script(model).save(str(p)),
            tmp_path / f"{name}.pt2": lambda p: save_exported(model, example, p),
        }
        for path, save in files.items():
            save(path)
            fmt = "torch-export" if path.suffix == ".pt2" else "torchscript"
            load_torch(ModelRef(uri=str(path), format=fmt), path)  # raises InputError if refused


def test_torch_export_graphs_are_checked_too():
    from mnnpipe.errors import InputError
    from mnnpipe.graph_allowlist import check_exported

    program = torch.export.export(torch.nn.Linear(4, 4), (torch.rand(1, 4),))
    check_exported("linear.pt2", program)
    # torch.export refuses to trace torch.from_file itself, so put it into a program's graph by hand
    node = next(n for n in program.graph.nodes if n.op == "call_function")
    node.target = torch.ops.aten.from_file.default
    with pytest.raises(InputError, match=r"linear\.pt2: refused.*aten::from_file"):
        check_exported("linear.pt2", program)


# --------------------------------------------------------------------------- item 3: archive size cap


def _zip_bomb_torchscript(path: Path, inflated: int) -> None:
    """A real TorchScript archive whose first storage member is `inflated` zero bytes, deflated
    (2 GiB is ~9 MB on disk at level 1)."""
    import zipfile

    src = path.with_suffix(".orig.pt")
    torch.jit.script(torch.nn.Linear(4, 4)).save(str(src))
    chunk = bytes(64 * 2**20)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            if not info.filename.endswith("/data/0"):
                zout.writestr(info, zin.read(info.filename))
                continue
            bomb = zipfile.ZipInfo(info.filename)
            bomb.compress_type = zipfile.ZIP_DEFLATED
            bomb._compresslevel = 1  # 2.3x faster to build than the default level; still ~230:1
            with zout.open(bomb, "w", force_zip64=True) as dst:
                for _ in range(inflated // len(chunk)):
                    dst.write(chunk)
                dst.write(bytes(inflated % len(chunk)))


def test_a_torchscript_zip_bomb_is_refused_before_loading(tmp_path, cache_dir):
    path = tmp_path / "bomb.pt"
    _zip_bomb_torchscript(path, 2 * 2**30 + 4096)
    assert path.stat().st_size < 16 * 2**20

    spec = {"models": [{"label": "bomb", "model": {"uri": str(path)}}], "inputs": [{"name": "input", "shape": [1, 4]}], "output": str(tmp_path / "out")}
    proc = _run_cli(tmp_path, "benchmark", spec)

    assert proc.returncode == 2, proc.stderr
    assert str(path) in proc.stderr and "zip bomb" in proc.stderr


def test_model_archives_are_capped_by_MNNPIPE_MAX_MODEL_BYTES(tmp_path, monkeypatch):
    from mnnpipe.errors import InputError, SpecError
    from mnnpipe.modelio import load_torch
    from mnnpipe.specs import ModelRef

    path = tmp_path / "linear.pt"
    torch.jit.script(torch.nn.Linear(256, 256)).save(str(path))  # 256 KiB of weights, stored
    ref = ModelRef(uri=str(path))
    load_torch(ref, path)
    monkeypatch.setenv("MNNPIPE_MAX_MODEL_BYTES", str(128 * 1024))
    with pytest.raises(InputError, match=r"linear\.pt: \d+ bytes uncompressed, more than the limit of 131072"):
        load_torch(ref, path)
    monkeypatch.setenv("MNNPIPE_MAX_MODEL_BYTES", "lots")
    with pytest.raises(SpecError, match="MNNPIPE_MAX_MODEL_BYTES: expected a positive number of bytes"):
        load_torch(ref, path)


# --------------------------------------------------------------------------- item 2: the confined child

# The measuring server with the graph allowlist switched off: what a model that got past the
# allowlist could do in the confined child.
_SERVER_WITHOUT_ALLOWLIST = [
    sys.executable,
    "-c",
    "import runpy, sys; import mnnpipe.graph_allowlist as g; g._ENABLED = False; "
    "sys.argv = ['measure_server', *sys.argv[1:]]; runpy.run_module('mnnpipe.engines.measure_server', run_name='__main__')",
]


def test_a_model_past_the_allowlist_cannot_write_outside_its_folder(tmp_path, monkeypatch):
    from mnnpipe.engines.measure import MeasureServer, measure_isolated
    from mnnpipe.errors import InputError
    from mnnpipe.specs import ModelRef

    path, target = _hostile(tmp_path, nested=True)
    x = [np.ones((1, 4), np.float32)]
    monkeypatch.setattr(MeasureServer, "command", _SERVER_WITHOUT_ALLOWLIST)
    monkeypatch.setenv("MNNPIPE_CONFINE", "required")

    with pytest.raises(InputError, match="the torch model cannot run"):  # torch.from_file: EACCES
        measure_isolated(ModelRef(uri=str(path)), path, settings=[(1, 1)], timing_inputs={1: x}, warmup=0, iterations=1)
    assert not target.exists()


_CONFINED_PROBE = """
import json, os, socket, sys
from mnnpipe import sandbox
scratch, outside, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = sandbox.confine([scratch])
seen = {"complete": c.complete}
def attempt(name, fn):
    try:
        fn()
        seen[name] = "allowed"
    except OSError as e:
        seen[name] = type(e).__name__
attempt("write inside", lambda: open(os.path.join(scratch, "ok"), "w").close())
attempt("write outside", lambda: open(outside, "w").close())
attempt("rename out", lambda: os.rename(os.path.join(scratch, "ok"), outside))
attempt("tcp to loopback", lambda: socket.create_connection(("127.0.0.1", port), timeout=2))
attempt("unix socket", lambda: socket.socket(socket.AF_UNIX))
attempt("udp socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
print(json.dumps(seen))
"""


def test_the_confined_process_writes_only_its_folder_and_has_no_network(tmp_path):
    import socket

    scratch, outside = tmp_path / "scratch", tmp_path / "outside"
    scratch.mkdir()
    with socket.socket() as server:  # something listening, so a refused connection means confinement
        server.bind(("127.0.0.1", 0))
        server.listen()
        proc = subprocess.run(
            [sys.executable, "-c", _CONFINED_PROBE, str(scratch), str(outside), str(server.getsockname()[1])],
            capture_output=True, text=True, timeout=120, env={**os.environ, "MNNPIPE_CONFINE": "required"},
        )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen == {
        "complete": True,
        "write inside": "allowed",
        "write outside": "PermissionError",
        "rename out": "PermissionError",
        "tcp to loopback": "PermissionError",
        "unix socket": "PermissionError",
        "udp socket": "PermissionError",
    }
    assert not outside.exists()


def test_confinement_required_fails_closed_where_a_layer_is_missing(tmp_path):
    probe = (
        "import sys; from mnnpipe import sandbox; sandbox.landlock_abi = lambda: 0\n"
        "try:\n    sandbox.confine([sys.argv[1]], 'required')\nexcept sandbox.ConfinementError as e:\n    print(e)\n"
        "print(sandbox.confine([sys.argv[1]], 'auto').describe())"
    )
    proc = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    required, auto = proc.stdout.strip().splitlines()
    assert required.startswith("MNNPIPE_CONFINE=required but this process cannot be confined: filesystem: no Landlock")
    assert "seccomp" in auto and "missing: filesystem: no Landlock" in auto


class _SetstateWrites(torch.nn.Module):
    """A scripted __setstate__: torch.jit.load runs it while loading, before any check of forward."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target
        self.w = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w(x)

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.target = state[0]
        self.training = state[1]
        torch.from_file(self.target, True, 16).copy_(torch.ones(16))


def test_a_scripted_setstate_is_refused_before_loading(tmp_path):
    from mnnpipe.errors import InputError
    from mnnpipe.modelio import load_torch
    from mnnpipe.specs import ModelRef

    target = tmp_path / "written-on-load"
    path = tmp_path / "setstate.pt"
    torch.jit.script(_SetstateWrites(str(target))).save(str(path))
    assert not target.exists()

    with pytest.raises(InputError, match=r"setstate\.pt: refused, the model uses a scripted __setstate__"):
        load_torch(ModelRef(uri=str(path)), path)
    assert not target.exists()


@torch.jit.script
def _helper_writes(path: str, x: torch.Tensor) -> torch.Tensor:
    return x + torch.from_file(path, True, 4).sum() * 0


@torch.jit.script
class _BoxWrites:
    def __init__(self, path: str) -> None:
        self.path = path

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.from_file(self.path, True, 4).sum() * 0


class _CallsAFunctionInALoop(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() > 0):
            for _ in range(2):
                x = _helper_writes("/nonexistent/f", x)
        return x


class _UsesAScriptedClass(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _BoxWrites("/nonexistent/f").apply(x)


@pytest.mark.parametrize("cls", [_CallsAFunctionInALoop, _UsesAScriptedClass])
def test_ops_in_called_functions_classes_and_nested_blocks_are_checked(tmp_path, cls):
    from mnnpipe.errors import InputError
    from mnnpipe.graph_allowlist import check_torchscript

    path = tmp_path / "m.pt"
    torch.jit.script(cls()).save(str(path))
    with pytest.raises(InputError, match="aten::from_file"):
        check_torchscript(str(path), torch.jit.load(str(path)))


def test_the_mnn_tools_write_only_their_cwd_and_output_folder(tmp_path):
    from mnnpipe.engines.mnn import _WORKER
    from mnnpipe.engines.onnx_export import export_onnx

    src = tmp_path / "m.onnx"
    export_onnx(torch.nn.Linear(4, 4).eval(), (torch.rand(1, 4),), src, input_names=["input"])
    allowed, elsewhere = tmp_path / "allowed", tmp_path / "elsewhere"
    allowed.mkdir()
    elsewhere.mkdir()
    env = {**os.environ, "MNNPIPE_TOOL_WRITABLE": str(allowed), "MNNPIPE_CONFINE": "required"}
    for folder in (allowed, elsewhere):
        args = ["mnnconvert", "-f", "ONNX", "--modelFile", str(src), "--MNNModel", str(folder / "m.mnn"), "--bizCode", "t"]
        subprocess.run([sys.executable, str(_WORKER), "mnnconvert", *args[1:]], cwd=allowed, env=env, capture_output=True, timeout=300)
    assert (allowed / "m.mnn").stat().st_size > 0
    assert not (elsewhere / "m.mnn").exists()


def test_an_invalid_MNNPIPE_CONFINE_is_a_spec_error(tmp_path, monkeypatch):
    from mnnpipe.engines.mnn import convert_onnx_to_mnn
    from mnnpipe.engines.measure import measure_isolated
    from mnnpipe.errors import SpecError
    from mnnpipe.specs import ModelRef

    monkeypatch.setenv("MNNPIPE_CONFINE", "maybe")
    path = tmp_path / "m.onnx"
    path.write_bytes(b"not read")
    with pytest.raises(SpecError, match="MNNPIPE_CONFINE: expected one of auto, required, off, got 'maybe'"):
        measure_isolated(ModelRef(uri=str(path)), path, settings=[(1, 1)], timing_inputs={1: [np.ones((1, 4), np.float32)]})
    with pytest.raises(SpecError, match="MNNPIPE_CONFINE"):
        convert_onnx_to_mnn(path, tmp_path / "m.mnn")
