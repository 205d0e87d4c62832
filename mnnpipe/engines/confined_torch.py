"""A torch model (TorchScript, .pt2, state-dict) loaded, run and exported to ONNX in a confined
child process, for the convert step's torch-side verification.

    with ConfinedTorchModel(ref, path, workdir, input_names=["input"]) as model:
        outputs = model.run([x])                     # like engines.runtimes.TorchRunner.run
        names = model.export_onnx([x], onnx_path, input_names=["input"], opset=17, dynamic_batch=True)

The child (`python -m mnnpipe.engines.confined_torch`) imports torch, confines itself
(mnnpipe.sandbox: writes only in `workdir`, no sockets) and only then loads the model, so the
model's code (and a scripted `__setstate__` run by torch.jit.load) never runs unconfined. Arrays
travel as .npy files in `workdir`; requests go over the child's stdin, replies over a pipe the
child's model code cannot forge (one line of JSON each).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mnnpipe.engines.runtimes import warn_if_unconfined
from mnnpipe.errors import InputError, MnnpipeError, SpecError, StepFailed, ToolError
from mnnpipe.sandbox import check_confine_policy
from mnnpipe.specs import ModelRef

_TAIL = 4
_ERRORS = {"InputError": InputError, "SpecError": SpecError, "StepFailed": StepFailed, "ToolError": ToolError}


class ConfinedTorchModel:
    def __init__(self, ref: ModelRef, path: Path, workdir: Path, *, input_names: Sequence[str], timeout_s: float = 1800) -> None:
        check_confine_policy()
        self.ref = ref
        self.input_names = list(input_names)
        self.output_names: list[str] = []
        self.timeout_s = timeout_s
        self.workdir = Path(tempfile.mkdtemp(prefix="torch-", dir=workdir))
        self._count = 0
        self._log = tempfile.TemporaryFile()
        reply_r, reply_w = os.pipe()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "mnnpipe.engines.confined_torch", str(reply_w)],
                stdin=subprocess.PIPE,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
                pass_fds=(reply_w,),
            )
        finally:
            os.close(reply_w)
        self._replies = os.fdopen(reply_r, "rb")
        self._finalizer = weakref.finalize(self, _shutdown, self._proc, self._replies, self._log, self.workdir)
        load = {"op": "load", "ref": ref.model_dump(mode="json"), "path": str(Path(path).absolute()), "workdir": str(self.workdir)}
        warn_if_unconfined(self._call({**load, "input_names": self.input_names}).get("confinement", {}))

    def _log_tail(self) -> str:
        self._log.seek(0)
        lines = [ln for ln in self._log.read().decode(errors="replace").splitlines() if ln.strip()]
        return " | ".join(lines[-_TAIL:]) or "no log output"

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        import select

        try:
            assert self._proc.stdin is not None
            self._proc.stdin.write((json.dumps(request) + "\n").encode())
            self._proc.stdin.flush()
        except OSError:
            raise ToolError(f"the torch process for {self.ref.uri} exited ({self._log_tail()})") from None
        ready, _, _ = select.select([self._replies], [], [], self.timeout_s)
        line = self._replies.readline() if ready else b""
        if not line:
            self.close()
            what = "timed out" if not ready else "exited"
            raise ToolError(f"the torch process for {self.ref.uri} {what} during '{request['op']}' ({self._log_tail()})")
        reply = json.loads(line)
        if "error" in reply:
            raise _ERRORS.get(reply["error"]["type"], ToolError)(reply["error"]["message"])
        return reply

    def _save(self, arrays: Sequence[np.ndarray]) -> list[str]:
        paths = []
        for a in arrays:
            self._count += 1
            p = self.workdir / f"in-{self._count}.npy"
            np.save(p, np.ascontiguousarray(a))
            paths.append(str(p))
        return paths

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        reply = self._call({"op": "run", "inputs": self._save(inputs)})
        outs = [np.load(p) for p in reply["outputs"]]
        for p in [*reply["outputs"]]:
            os.unlink(p)
        if not self.output_names:
            self.output_names = ["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))]
        return outs

    def export_onnx(self, example: Sequence[np.ndarray], path: Path, *, input_names: Sequence[str], opset: int, dynamic_batch: bool) -> list[str]:
        """engines.onnx_export.export_onnx in the child; the file (and any external-data files the
        exporter writes beside it, under the names the model refers to) then moves to `path`'s folder."""
        folder = self.workdir / "export"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        request = {"op": "export", "example": self._save(example), "path": str(folder / path.name), "input_names": list(input_names)}
        reply = self._call({**request, "opset": opset, "dynamic_batch": dynamic_batch})
        path.parent.mkdir(parents=True, exist_ok=True)
        for produced in folder.iterdir():
            shutil.move(str(produced), str(path.parent / produced.name))
        return list(reply["output_names"])

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> ConfinedTorchModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shutdown(proc: subprocess.Popen, replies: Any, log: Any, workdir: Path) -> None:
    if proc.poll() is None:
        try:
            assert proc.stdin is not None
            proc.stdin.close()  # end of requests: the child exits
            proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
    replies.close()
    log.close()
    shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- the child


def _serve(reply_fd: int) -> int:
    import torch

    from mnnpipe import sandbox
    from mnnpipe.engines.onnx_export import export_onnx
    from mnnpipe.engines.runtimes import TorchRunner
    from mnnpipe.modelio import load_torch

    torch.set_num_threads(1)
    replies = os.fdopen(reply_fd, "w")
    runner: TorchRunner | None = None
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "load":
                workdir = Path(request["workdir"])
                try:
                    confinement = sandbox.confine([workdir])  # before the model is even loaded
                except sandbox.ConfinementError as exc:
                    raise ToolError(str(exc)) from None
                ref = ModelRef.model_validate(request["ref"])
                runner = TorchRunner(load_torch(ref, Path(request["path"])), request["input_names"])
                reply: dict[str, Any] = {"confinement": {"complete": confinement.complete, "describe": confinement.describe()}}
            elif request["op"] == "run":
                assert runner is not None
                outs = runner.run([np.load(p) for p in request["inputs"]])
                paths = []
                for i, o in enumerate(outs):
                    p = Path(request["inputs"][0]).with_name(f"out-{Path(request['inputs'][0]).stem}-{i}.npy")
                    np.save(p, o)
                    paths.append(str(p))
                reply = {"outputs": paths}
            else:  # export
                assert runner is not None
                example = tuple(torch.from_numpy(np.load(p)) for p in request["example"])
                names = export_onnx(
                    runner.model, example, request["path"], input_names=request["input_names"], opset=request["opset"], dynamic_batch=request["dynamic_batch"]
                )
                reply = {"output_names": names}
            for p in request.get("inputs", []) + request.get("example", []):
                os.unlink(p)
        except MnnpipeError as exc:
            reply = {"error": {"type": type(exc).__name__, "message": str(exc)}}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_serve(int(sys.argv[1])))
