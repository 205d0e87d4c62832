"""Is a .mnn file a model MNN can load and run? Asked in a child process, with a time limit.

A truncated or bit-flipped .mnn can pass MNN's own checks and then hang (a flipped kernel size
made one loop on "Not Enough Memory" forever) or crash the process that runs it. So a step that
takes a .mnn from outside loads it and runs it once on zeros in a child first; what the child
prints is discarded (MNN can print millions of lines), only its verdict file is read. The child
confines itself (mnnpipe/sandbox.py) before MNN parses the file, as the other MNN children do.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import InputError, ToolError
from .mnn import signal_name

PROBE_TIMEOUT_S = 120.0  # loading and one forward of a model of several GB takes seconds
_CANNOT_CONFINE = 4  # the child's exit status when MNNPIPE_CONFINE=required cannot be met
_MAX_INPUT_ELEMENTS = 1 << 28  # as specs.TensorSpec: a larger declared input is a flipped bit, not a model


def check_loadable(path: Path, label: str, *, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise InputError '<label>: not a loadable .mnn model (...)' unless MNN loads `path` and
    runs it once on zeros within `timeout_s`, in a child process."""
    with tempfile.TemporaryDirectory(prefix="mnn-probe-") as tmp:
        verdict = Path(tmp) / "verdict.txt"
        cmd = [sys.executable, "-m", __name__, str(Path(path).absolute()), str(verdict)]
        try:
            proc = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp, timeout=timeout_s
            )
        except subprocess.TimeoutExpired:
            raise InputError(
                f"{label}: not a loadable .mnn model (loading it and running it once on zeros did not finish within {timeout_s:g} s)"
            ) from None
        if proc.returncode == 0:
            return
        reason = verdict.read_text().strip() if verdict.is_file() else ""
        if proc.returncode == _CANNOT_CONFINE:
            raise ToolError(f"{label}: cannot check the .mnn model in a confined process ({reason})")
        if not reason:
            reason = f"MNN crashed with {signal_name(proc.returncode)}" if proc.returncode < 0 else f"MNN crashed with exit status {proc.returncode}"
        raise InputError(f"{label}: not a loadable .mnn model ({reason})")




def _probe(path: str) -> str | None:
    """None when the model loads and runs on zeros; else why not."""
    import numpy as np

    from .mnn import import_mnn, load_session

    import_mnn()
    import MNN.expr as F

    try:
        session = load_session(path)
    except InputError:
        return "MNN could not load it"
    if not session.input_names or not session.output_names:
        return "it declares no inputs or no outputs"
    variables = F.load_as_dict(path)
    arrays = []
    for name in session.input_names:
        var = variables.get(name)
        if var is None:
            return f"input '{name}' is not in the graph"
        shape = [d if d > 0 else 1 for d in var.shape]  # a dynamic dimension runs at 1
        if int(np.prod(shape, dtype=np.float64)) > _MAX_INPUT_ELEMENTS:
            return f"input '{name}' declares shape {shape}"
        arrays.append(np.zeros(shape, np.int32 if var.dtype == F.int else np.float32))
    try:
        session.run(arrays)
    except Exception as e:  # InputError for missing outputs; MNN raises others of its own
        return f"MNN could not run it on zeros of its declared input shapes ({type(e).__name__})"
    return None


def _main(model: str, verdict: Path) -> int:
    from ..sandbox import ConfinementError, confine

    try:  # before MNN parses a byte (and while single-threaded): write only the verdict's folder, no sockets
        confine([verdict.parent])
    except ConfinementError as exc:
        verdict.write_text(str(exc))
        return _CANNOT_CONFINE
    why = _probe(model)
    if why is not None:
        verdict.write_text(why)
    return 0 if why is None else 3


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1], Path(sys.argv[2])))
