"""Measure models in processes of their own: latency per (threads, batch) and peak memory.

    with MeasureServer(settings=[(1, 1), (2, 1)], timing_inputs={1: [x]}) as server:
        m = server.measure(ref, path)          # Measurement: m.latency[setting_key(1, 1)].p50_ms
    m = measure_isolated(ref, path, settings=[(1, 1)], timing_inputs={1: [x]})   # one model

A MeasureServer starts one server process (`python -m mnnpipe.engines.measure_server`) that
imports each runtime once and forks a process per model, so that memory can be measured honestly
(engines.peak_rss), a native crash cannot take the caller down, and the model runs confined
(mnnpipe.sandbox: no writes outside its result folder, no sockets). Requests and replies travel
as lines of JSON (engines.line_child); the results, arrays included, as files in a private folder.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mnnpipe.engines.line_child import LineChild, NoReply, raise_reported, warn_if_unconfined
from mnnpipe.engines.timing import Latency
from mnnpipe.errors import ToolError
from mnnpipe.sandbox import check_confine_policy
from mnnpipe.specs import ModelRef

__all__ = ["MeasureServer", "Measurement", "measure_isolated", "setting_key"]


@dataclass
class Measurement:
    """What one child process measured for one model."""

    latency: dict[str, Latency] = field(default_factory=dict)  # key "t{threads}/b{batch}"
    baseline_rss_bytes: int = 0
    peak_rss_bytes: int = 0
    eval_outputs: list[np.ndarray] | None = None  # first output per eval sample, stacked
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)

    @property
    def peak_rss_delta_bytes(self) -> int:
        return max(0, self.peak_rss_bytes - self.baseline_rss_bytes)


def setting_key(threads: int, batch: int) -> str:
    return f"t{threads}/b{batch}"


def measure_isolated(ref: ModelRef, path: Path, **options: Any) -> Measurement:
    """Time `ref` in a fresh, confined process for each (threads, batch) in `settings`; measure peak RSS.

    `options` are MeasureServer's. `timing_inputs[batch]` are the input arrays for that batch
    size. `eval_inputs` (one array per model input, first axis = samples) are run one sample at a
    time after the timing, with the first setting's thread count, and their first output comes
    back stacked (for accuracy or fidelity); running them after the peak RSS is read keeps them
    out of the memory figure. Raises the child's InputError/ToolError as the same class; a crash
    becomes ToolError. Several models: use one MeasureServer, which imports each runtime once for
    all of them.
    """
    with MeasureServer(**options) as server:
        return server.measure(ref, path)


class MeasureServer:
    """A fork server for isolated measurements (`python -m mnnpipe.engines.measure_server`).

    One child process reads the inputs once and imports each runtime once, when the first model
    that needs it arrives; for every model it then forks a fresh process that confines itself
    (mnnpipe.sandbox: writes only in its own result folder, no sockets), loads, times and
    evaluates the model, and exits. A fork costs milliseconds where a fresh interpreter re-imports
    torch/MNN/ONNX Runtime for seconds, and each model still gets a process of its own (its
    memory measured alone, a crash contained). Close it (or let it be garbage-collected).
    """

    command = [sys.executable, "-m", "mnnpipe.engines.measure_server"]  # tests swap it to reach the server's internals

    def __init__(
        self,
        *,
        settings: Sequence[tuple[int, int]],
        timing_inputs: dict[int, list[np.ndarray]],
        eval_inputs: list[np.ndarray] | None = None,
        precision: str = "normal",
        warmup: int = 5,
        iterations: int = 30,
        input_names: Sequence[str] | None = None,
        timeout_s: float = 1800,
    ) -> None:
        check_confine_policy()
        self._tmp = tempfile.TemporaryDirectory(prefix="mnnpipe-measure-")
        self.root = Path(self._tmp.name)
        arrays = {f"b{b}_{i}": a for b, xs in timing_inputs.items() for i, a in enumerate(xs)}
        if eval_inputs is not None:
            arrays.update({f"eval_{i}": a for i, a in enumerate(eval_inputs)})
        np.savez(self.root / "inputs.npz", **arrays)
        self.timeout_s = timeout_s
        job = {
            "settings": [list(s) for s in settings],
            "n_inputs": len(next(iter(timing_inputs.values()))),
            "has_eval": eval_inputs is not None,
            "precision": precision,
            "warmup": warmup,
            "iterations": iterations,
            "input_names": list(input_names) if input_names else None,
            "inputs": str(self.root / "inputs.npz"),
            "timeout_s": timeout_s,
        }
        (self.root / "job.json").write_text(json.dumps(job))
        env = {**os.environ, "OMP_NUM_THREADS": str(max(t for t, _ in settings))}
        self._child = LineChild([*self.command, str(self.root / "job.json")], env=env, cleanup=self._tmp.cleanup)
        self._count = 0

    def measure(self, ref: ModelRef, path: Path) -> Measurement:
        self._count += 1
        out = self.root / f"model-{self._count}"
        out.mkdir()
        request = {"ref": ref.model_dump(mode="json"), "path": str(Path(path).absolute()), "out": str(out)}
        try:
            # the server kills a model's process at timeout_s; the slack covers importing a runtime
            reply = self._child.call(request, self.timeout_s + 300)
        except NoReply as e:
            what = "no answer from the measuring process" if e.sent else "the measuring process exited"
            raise ToolError(f"measuring {ref.uri} failed: {what} ({e.log_tail})") from None
        result_path = out / "result.json"
        if reply["status"] == "timeout":
            raise ToolError(f"measuring {ref.uri} timed out after {self.timeout_s:g} s")
        if not result_path.is_file():
            raise ToolError(f"measuring {ref.uri} failed ({reply['status']}): {self._child.log_tail()}")
        data = json.loads(result_path.read_text())
        if "error" in data:
            raise_reported(data["error"])
        warn_if_unconfined(data.get("confinement", {}))
        m = Measurement(
            latency={k: Latency(**v) for k, v in data["latency"].items()},
            baseline_rss_bytes=data["baseline_rss_bytes"],
            peak_rss_bytes=data["peak_rss_bytes"],
            input_names=data["input_names"],
            output_names=data["output_names"],
        )
        if (out / "eval.npy").is_file():
            m.eval_outputs = list(np.load(out / "eval.npy"))
        return m

    def close(self) -> None:
        self._child.close()

    def __enter__(self) -> MeasureServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
