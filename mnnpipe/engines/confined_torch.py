"""A torch model (TorchScript, .pt2, state-dict) loaded, run and exported to ONNX in a confined
child process, for the convert step's torch-side verification.

    with ConfinedTorchModel(ref, path, workdir, input_names=["input"]) as model:
        outputs = model.run([x])                     # like engines.runtimes.TorchRunner.run
        names = model.export_onnx([x], onnx_path, input_names=["input"], opset=17, dynamic_batch=True)

The child (`python -m mnnpipe.engines.confined_torch`) imports torch, confines itself
(mnnpipe.sandbox: writes only in `workdir`, no sockets) and only then loads the model, so the
model's code (and a scripted `__setstate__` run by torch.jit.load) never runs unconfined. Arrays
travel as .npy files in `workdir`; requests go over the child's stdin, replies over a pipe the
child's model code cannot forge (one line of JSON each; engines.line_child).
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mnnpipe.engines.line_child import LineChild, NoReply, confine, error_reply, raise_reported, serve_lines, warn_if_unconfined
from mnnpipe.errors import MnnpipeError, ToolError
from mnnpipe.sandbox import check_confine_policy
from mnnpipe.specs import ModelRef


class ConfinedTorchModel:
    def __init__(self, ref: ModelRef, path: Path, workdir: Path, *, input_names: Sequence[str], timeout_s: float = 1800) -> None:
        check_confine_policy()
        self.ref = ref
        self.input_names = list(input_names)
        self.output_names: list[str] = []
        self.timeout_s = timeout_s
        self.workdir = Path(tempfile.mkdtemp(prefix="torch-", dir=workdir))
        self._count = 0
        self._child = LineChild(
            [sys.executable, "-m", "mnnpipe.engines.confined_torch"],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            cleanup=functools.partial(shutil.rmtree, self.workdir, ignore_errors=True),
        )
        load = {"op": "load", "ref": ref.model_dump(mode="json"), "path": str(Path(path).absolute()), "workdir": str(self.workdir)}
        warn_if_unconfined(self._call({**load, "input_names": self.input_names}).get("confinement", {}))

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            reply = self._child.call(request, self.timeout_s)
        except NoReply as e:
            if not e.sent:
                raise ToolError(f"the torch process for {self.ref.uri} exited ({e.log_tail})") from None
            what = "timed out" if e.timed_out else "exited"
            raise ToolError(f"the torch process for {self.ref.uri} {what} during '{request['op']}' ({e.log_tail})") from None
        if "error" in reply:
            raise_reported(reply["error"])
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
        self._child.close()

    def __enter__(self) -> ConfinedTorchModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- the child


def _serve(reply_fd: int) -> int:
    import torch

    from mnnpipe.engines.onnx_export import export_onnx
    from mnnpipe.engines.runtimes import TorchRunner
    from mnnpipe.modelio import load_torch

    torch.set_num_threads(1)
    runner: TorchRunner | None = None

    def handle(request: dict[str, Any]) -> dict[str, Any]:
        nonlocal runner
        try:
            if request["op"] == "load":
                confinement = confine([Path(request["workdir"])])  # before the model is even loaded
                ref = ModelRef.model_validate(request["ref"])
                runner = TorchRunner(load_torch(ref, Path(request["path"])), request["input_names"])
                reply: dict[str, Any] = {"confinement": confinement}
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
            reply = error_reply(exc)
        return reply

    return serve_lines(reply_fd, handle)


if __name__ == "__main__":
    sys.exit(_serve(int(sys.argv[1])))
