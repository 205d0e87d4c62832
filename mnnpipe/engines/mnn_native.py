"""Time a .mnn with an MNN runtime built from source for this CPU (scripts/build-mnn.sh).

The PyPI wheel has no AVX-512/VNNI kernels, so on x86 CPUs that have them its int8 numbers
understate what MNN can do; a runtime built with MNN_AVX512(_VNNI) shows the rest. The build's
``benchmark.out`` (MNN's own tool) times every model in a folder with MNN's Session API:
``benchmark.out FOLDER LOOPS WARMUP FORWARD THREADS PRECISION`` and prints, per model,
``[ - ] name    max = X ms  min = Y ms  avg = Z ms``. It feeds random inputs of the model's
stored input shape (batch 1 for mnnpipe's models) and reports no median: only min/avg/max.

Where the tool is comes from the environment variable MNNPIPE_MNN_BENCHMARK (a host path, so not
a spec field); unset, nothing here runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, ToolError

__all__ = ["ENV", "NativeTiming", "native_tool", "parse_benchmark_output", "time_native"]

ENV = "MNNPIPE_MNN_BENCHMARK"
_LINE = re.compile(r"^\[ - \]\s+(?P<name>\S+)\s+max =\s*(?P<max>[\d.]+) ms\s+min =\s*(?P<min>[\d.]+) ms\s+avg =\s*(?P<avg>[\d.]+) ms")
_PRECISION = {"normal": 0, "high": 1, "low": 2}  # MNN::BackendConfig::PrecisionMode


@dataclass(frozen=True)
class NativeTiming:
    min_ms: float
    avg_ms: float
    max_ms: float


def native_tool() -> Path | None:
    """The configured benchmark.out, or None when MNNPIPE_MNN_BENCHMARK is unset. Raises InputError
    when it is set to something that is not an executable file."""
    value = os.environ.get(ENV)
    if not value:
        return None
    tool = Path(value)
    if not (tool.is_file() and os.access(tool, os.X_OK)):
        raise InputError(f"{ENV}={value}: not an executable file (expected MNN's benchmark.out from scripts/build-mnn.sh)")
    return tool


def parse_benchmark_output(text: str) -> dict[str, NativeTiming]:
    """{model file name: timing} from benchmark.out's output."""
    out = {}
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if m:
            out[m["name"]] = NativeTiming(float(m["min"]), float(m["avg"]), float(m["max"]))
    return out


def time_native(tool: Path, mnn_path: Path, *, threads: int, warmup: int, iterations: int, precision: str = "normal", timeout_s: float = 1800) -> NativeTiming:
    """Time one .mnn with ``tool`` (benchmark.out) in its own process. Raises ToolError when the
    tool fails or prints no timing for the model."""
    with tempfile.TemporaryDirectory(prefix="mnn-native-") as tmp:
        folder = Path(tmp)
        (folder / "model.mnn").symlink_to(mnn_path.resolve())  # the tool times every file in the folder
        cmd = [str(tool), str(folder), str(iterations), str(warmup), "0", str(threads), str(_PRECISION[precision])]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL, cwd=tmp)
        except subprocess.TimeoutExpired:
            raise ToolError(f"{tool.name} timed out after {timeout_s:g} s on {mnn_path.name}") from None
        timing = parse_benchmark_output(proc.stdout).get("model.mnn")
        if proc.returncode != 0 or timing is None:
            tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:]) or "no output"
            raise ToolError(f"{tool.name} failed on {mnn_path.name} (exit status {proc.returncode}): {tail}")
        return timing
