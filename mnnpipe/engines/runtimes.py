"""Load a model of any format and run it or time it: torch, ONNX Runtime, MNN — one interface.

    runner = open_model(ref, path, threads=2)          # ModelRef + its local file
    outputs = runner.run([x])                          # list of numpy arrays, one per output
    latency = time_runner(runner, [x], warmup=10, iterations=30)

`measure_isolated` / `MeasureServer` do the same in a process of its own per model, forked from
one server process that imports each runtime once (`python -m mnnpipe.engines.runtimes`), so
that memory can be measured honestly, a native crash cannot take the caller down, and the model
runs confined (mnnpipe.sandbox: no writes outside its result folder, no sockets).

Peak memory, the method: Python's tracemalloc cannot see what torch, ONNX Runtime or MNN
allocate in C++, so the child asks the kernel. After importing the one runtime it needs and
reading its inputs it records its resident set size and resets the kernel's peak to it
(`/proc/self/clear_refs` = 5; the baseline), then loads the model, runs every timed setting
and reads the peak resident set size (`VmHWM`; `ru_maxrss` where /proc is missing).
`peak_rss_delta_bytes` is the difference: the model's weights, the runtime's arenas and
activations at the largest batch, and nothing from other models (one process per model).

Threads: torch uses `torch.set_num_threads` (process-wide; fine in a child), ONNX Runtime
`intra_op_num_threads` (inter-op 1), MNN the runtime key `numThread`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from mnnpipe.errors import InputError, MnnpipeError, SpecError, StepFailed, ToolError
from mnnpipe.engines.mnn import signal_name
from mnnpipe.sandbox import check_confine_policy
from mnnpipe.specs import ModelRef

__all__ = [
    "Latency",
    "Measurement",
    "ModelRunner",
    "OnnxRunner",
    "MnnRunner",
    "TorchRunner",
    "measure_isolated",
    "open_model",
    "time_runner",
]

_TAIL = 4


class ModelRunner(Protocol):
    """A loaded model: positional numpy inputs in, numpy outputs out (one per model output)."""

    input_names: list[str]
    output_names: list[str]

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]: ...


class TorchRunner:
    """A torch module in eval mode, run under no_grad."""

    def __init__(self, model: Any, input_names: list[str]) -> None:
        self.model = model
        self.input_names = input_names
        self.output_names: list[str] = []

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        import torch

        try:
            with torch.no_grad():
                out = self.model(*[torch.from_numpy(np.ascontiguousarray(a)) for a in inputs])
        except (RuntimeError, AssertionError, ValueError, TypeError) as exc:
            # almost always inputs that do not fit the model (channels, rank, a .pt2 shape guard)
            raise InputError(f"the torch model cannot run on inputs {_describe(self.input_names, inputs)} ({_first_line(exc)})") from None
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        if not self.output_names:
            self.output_names = ["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))]
        return [o.detach().float().numpy() for o in outs]


class OnnxRunner:
    """An ONNX Runtime CPU session."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(inputs) != len(self.input_names):
            raise InputError(f"the ONNX model takes inputs {self.input_names}, got {len(inputs)} arrays")
        try:
            return list(self.session.run(None, dict(zip(self.input_names, inputs))))
        except Exception as exc:  # onnxruntime's InvalidArgument/Fail are not exported types
            raise InputError(f"ONNX Runtime cannot run on inputs {_describe(self.input_names, inputs)} ({_first_line(exc)})") from None


class MnnRunner:
    """An MNN module via engines.mnn.load_session."""

    def __init__(
        self,
        path: Path,
        threads: int,
        precision: str,
        input_names: Sequence[str] | None = None,
        output_names: Sequence[str] | None = None,
    ) -> None:
        from mnnpipe.engines.mnn import load_session

        self.session = load_session(
            path,
            threads=threads,
            precision=precision,
            input_names=list(input_names) if input_names else None,
            output_names=list(output_names) if output_names else None,
        )
        self.input_names = self.session.input_names
        self.output_names = self.session.output_names

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        try:
            return self.session.run(list(inputs))
        except (IndexError, RuntimeError, ValueError) as exc:
            # MNN prints a shape error to stderr and returns nothing (IndexError downstream)
            raise InputError(f"MNN cannot run {self.session.path.name} on inputs {_describe(self.input_names, inputs)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:240] if text else type(exc).__name__


def _describe(names: Sequence[str], inputs: Sequence[np.ndarray]) -> str:
    names = list(names) + [f"#{i}" for i in range(len(names), len(inputs))]
    return ", ".join(f"'{n}' {list(np.shape(a))}" for n, a in zip(names, inputs))


def open_model(
    ref: ModelRef,
    path: Path,
    *,
    threads: int = 1,
    precision: str = "normal",
    input_names: Sequence[str] | None = None,
) -> ModelRunner:
    """Load `path` (the local file of `ref`) with the runtime that fits its format.

    `precision` applies to MNN only. Raises InputError for a missing, corrupt or unloadable file.
    """
    if not path.is_file():
        raise InputError(f"{ref.uri}: model file not found")
    if ref.format == "mnn":
        return MnnRunner(path, threads, precision)
    if ref.format == "openvino":
        from .peers import OpenVinoRunner

        return OpenVinoRunner(path, threads)
    if ref.format == "onnx":
        try:
            return OnnxRunner(path, threads)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise InputError(f"{ref.uri}: not a loadable ONNX model ({_first_line(exc)})") from None
    import torch

    from mnnpipe.modelio import load_torch

    torch.set_num_threads(int(threads))
    return TorchRunner(load_torch(ref, path), list(input_names or ["input"]))


@dataclass(frozen=True)
class Latency:
    """Wall-clock latency of one `run` call, in milliseconds, after warm-up."""

    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    iterations: int

    @classmethod
    def from_seconds(cls, times: Sequence[float]) -> Latency:
        ms = np.asarray(times, np.float64) * 1e3
        return cls(
            mean_ms=float(ms.mean()),
            p50_ms=float(np.percentile(ms, 50)),
            p90_ms=float(np.percentile(ms, 90)),
            p99_ms=float(np.percentile(ms, 99)),
            iterations=len(ms),
        )


def time_runner(runner: ModelRunner, inputs: Sequence[np.ndarray], *, warmup: int, iterations: int) -> Latency:
    """Run `warmup` untimed calls, then time `iterations` calls one by one."""
    if iterations < 1:
        raise ValueError("iterations must be >= 1")
    for _ in range(warmup):
        runner.run(inputs)
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        runner.run(inputs)
        times.append(time.perf_counter() - t0)
    return Latency.from_seconds(times)


# --------------------------------------------------------------------------- isolated measurement


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


def measure_isolated(
    ref: ModelRef,
    path: Path,
    *,
    settings: Sequence[tuple[int, int]],
    timing_inputs: dict[int, list[np.ndarray]],
    eval_inputs: list[np.ndarray] | None = None,
    precision: str = "normal",
    warmup: int = 5,
    iterations: int = 30,
    input_names: Sequence[str] | None = None,
    timeout_s: float = 1800,
) -> Measurement:
    """Time `ref` in a fresh, confined process for each (threads, batch) in `settings`; measure peak RSS.

    `timing_inputs[batch]` are the input arrays for that batch size. `eval_inputs` (one array per
    model input, first axis = samples) are run one sample at a time after the timing, with the
    first setting's thread count, and their first output comes back stacked (for accuracy or
    fidelity); running them after the peak RSS is read keeps them out of the memory figure.
    Raises the child's InputError/ToolError as the same class; a crash becomes ToolError.
    Several models: use one MeasureServer, which imports each runtime once for all of them.
    """
    server = MeasureServer(
        settings=settings,
        timing_inputs=timing_inputs,
        eval_inputs=eval_inputs,
        precision=precision,
        warmup=warmup,
        iterations=iterations,
        input_names=input_names,
        timeout_s=timeout_s,
    )
    try:
        return server.measure(ref, path)
    finally:
        server.close()


_warned_confinement = False


class MeasureServer:
    """A fork server for isolated measurements (`python -m mnnpipe.engines.runtimes`).

    One child process reads the inputs once and imports each runtime once, when the first model
    that needs it arrives; for every model it then forks a fresh process that confines itself
    (mnnpipe.sandbox: writes only in its own result folder, no sockets), loads, times and
    evaluates the model, and exits. A fork costs milliseconds where a fresh interpreter re-imports
    torch/MNN/ONNX Runtime for seconds, and each model still gets a process of its own (its
    memory measured alone, a crash contained). Close it (or let it be garbage-collected).
    """

    command = [sys.executable, "-m", "mnnpipe.engines.runtimes"]  # tests swap it to reach the server's internals

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
        import weakref

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
        self._log = tempfile.TemporaryFile()
        reply_r, reply_w = os.pipe()  # a channel the forked, untrusted processes do not hold
        try:
            self._proc = subprocess.Popen(
                [*self.command, str(self.root / "job.json"), str(reply_w)],
                stdin=subprocess.PIPE,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                pass_fds=(reply_w,),
            )
        finally:
            os.close(reply_w)
        self._replies = os.fdopen(reply_r, "rb")
        self._count = 0
        self._finalizer = weakref.finalize(self, _shutdown, self._proc, self._replies, self._log, self._tmp)

    def _log_tail(self) -> str:
        self._log.seek(0)
        lines = [ln for ln in self._log.read().decode(errors="replace").splitlines() if ln.strip()]
        return " | ".join(lines[-_TAIL:]) or "no log output"

    def measure(self, ref: ModelRef, path: Path) -> Measurement:
        import select

        self._count += 1
        out = self.root / f"model-{self._count}"
        out.mkdir()
        request = {"ref": ref.model_dump(mode="json"), "path": str(Path(path).absolute()), "out": str(out)}
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.write((json.dumps(request) + "\n").encode())
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise ToolError(f"measuring {ref.uri} failed: the measuring process exited ({self._log_tail()})") from None
        # the server kills a model's process at timeout_s; the slack covers importing a runtime
        ready, _, _ = select.select([self._replies], [], [], self.timeout_s + 300)
        line = self._replies.readline() if ready else b""
        if not line:
            self.close()
            raise ToolError(f"measuring {ref.uri} failed: no answer from the measuring process ({self._log_tail()})")
        reply = json.loads(line)
        result_path = out / "result.json"
        if reply["status"] == "timeout":
            raise ToolError(f"measuring {ref.uri} timed out after {self.timeout_s:g} s")
        if not result_path.is_file():
            raise ToolError(f"measuring {ref.uri} failed ({reply['status']}): {self._log_tail()}")
        data = json.loads(result_path.read_text())
        if "error" in data:
            cls = {"InputError": InputError, "SpecError": SpecError, "StepFailed": StepFailed}.get(data["error"]["type"], ToolError)
            raise cls(data["error"]["message"])
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
        self._finalizer()

    def __enter__(self) -> MeasureServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shutdown(proc: subprocess.Popen, replies: Any, log: Any, tmp: tempfile.TemporaryDirectory) -> None:
    try:
        if proc.stdin is not None:
            proc.stdin.close()  # end of requests: the server exits
        proc.wait(timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()
    replies.close()
    log.close()
    tmp.cleanup()


def warn_if_unconfined(confinement: dict[str, Any]) -> None:
    global _warned_confinement
    if confinement.get("complete") or _warned_confinement:
        return
    import logging

    _warned_confinement = True
    logging.getLogger("mnnpipe.sandbox").warning("untrusted models run only partly confined here: %s", confinement.get("describe", "unknown"))


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> int:
    """Current RSS in bytes, with the kernel's peak (VmHWM) reset to it where Linux allows.

    Without the reset, a transient peak while importing torch would hide the model's own use.
    Falls back to ru_maxrss (the peak so far) when /proc is not available.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak resident set size to the current one
    except OSError:
        return _peak_rss_bytes()
    rss = _status_kib("VmRSS")
    return rss * 1024 if rss is not None else _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _import_runtime(fmt: str) -> None:
    """Import the runtime a model format needs (before the baseline, so it is not counted)."""
    if fmt == "mnn":
        from .mnn import import_mnn

        import_mnn()
    elif fmt == "onnx":
        import onnxruntime  # noqa: F401
    elif fmt == "openvino":
        import openvino  # noqa: F401
    else:
        import torch  # noqa: F401

        import mnnpipe.modelio  # noqa: F401


def _serve(job_path: str, reply_fd: int) -> int:
    """The fork server: one request line per model on stdin, one reply line on `reply_fd`."""
    job = json.loads(Path(job_path).read_text())
    with np.load(job["inputs"]) as npz:
        arrays = {k: npz[k] for k in npz.files}
    replies = os.fdopen(reply_fd, "w")
    for line in sys.stdin:
        request = json.loads(line)
        try:
            _import_runtime(request["ref"].get("format") or "")
        except ImportError:
            pass  # the forked process fails the same way and reports it
        mapped = _mapped_file_pages()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the model's own process: never returns
            code = 1
            try:
                os.close(reply_fd)
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                _map_again(mapped)
                code = _measure_one(job, arrays, request)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        replies.write(json.dumps({"status": _wait(pid, job["timeout_s"])}) + "\n")
        replies.flush()
    return 0


def _mapped_file_pages() -> list[tuple[int, int]]:
    """(address, length) of the file-backed pages this process has mapped (its runtimes' code).

    fork copies no page-table entries of file mappings, so a forked process would fault the
    runtime's libraries in again while it runs the model, and they would count as the model's
    memory; `_map_again` restores them before the baseline (a few ms). Read from /proc/self/pagemap
    (bit 63: present); empty where it is not readable.
    """
    page = os.sysconf("SC_PAGE_SIZE")
    ranges: list[tuple[int, int]] = []
    try:
        with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb") as pagemap:
            for line in maps:
                parts = line.split()
                if len(parts) < 6 or not parts[5].startswith("/") or "r" not in parts[1]:
                    continue
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                pagemap.seek(lo // page * 8)
                present = (np.frombuffer(pagemap.read((hi - lo) // page * 8), dtype=np.uint64) >> np.uint64(63)).astype(np.int8)
                edges = np.flatnonzero(np.diff(np.concatenate(([0], present, [0]))))
                ranges += [(lo + int(a) * page, int(b - a) * page) for a, b in zip(edges[::2], edges[1::2])]
    except (OSError, ValueError):
        return []
    return ranges


def _map_again(ranges: list[tuple[int, int]]) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for address, length in ranges:
        libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), 22)  # MADV_POPULATE_READ (Linux 5.14+)


def _wait(pid: int, timeout_s: float) -> str:
    """'ok', 'exit status N', 'crashed with SIG...' or 'timeout' (then the process is killed)."""
    import select
    import signal

    status: int | None = None  # set when the polling fallback has already reaped the child
    try:
        pidfd = os.pidfd_open(pid)
        ready, _, _ = select.select([pidfd], [], [], timeout_s)
        os.close(pidfd)
        timed_out = not ready
    except (AttributeError, OSError):  # no pidfd (not Linux): poll
        deadline = time.monotonic() + timeout_s
        while status is None and time.monotonic() < deadline:
            reaped, polled = os.waitpid(pid, os.WNOHANG)
            if reaped:
                status = polled
            else:
                time.sleep(0.01)
        timed_out = status is None
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    if status is None:
        _, status = os.waitpid(pid, 0)
    if timed_out:
        return "timeout"
    if os.WIFSIGNALED(status):
        return f"crashed with {signal_name(-os.WTERMSIG(status))}"
    code = os.WEXITSTATUS(status)
    return "ok" if code == 0 else f"exit status {code}"


def _measure_one(job: dict[str, Any], arrays: dict[str, np.ndarray], request: dict[str, Any]) -> int:
    from mnnpipe import sandbox

    out = Path(request["out"])
    try:
        ref = ModelRef.model_validate(request["ref"])
        _import_runtime(ref.format)
        baseline = _reset_peak_rss()  # before confining: the reset writes /proc/self/clear_refs
        try:
            confinement = sandbox.confine([out])
        except sandbox.ConfinementError as exc:
            raise ToolError(str(exc)) from None
        settings = [tuple(s) for s in job["settings"]]
        latency: dict[str, Any] = {}
        runner = None
        runner_threads = None
        for threads, batch in settings:
            if runner is None or threads != runner_threads:
                runner = open_model(ref, Path(request["path"]), threads=threads, precision=job["precision"], input_names=job["input_names"])
                runner_threads = threads
            xs = [arrays[f"b{batch}_{i}"] for i in range(job["n_inputs"])]
            latency[setting_key(threads, batch)] = asdict(time_runner(runner, xs, warmup=job["warmup"], iterations=job["iterations"]))
        peak = _peak_rss_bytes()
        assert runner is not None
        if job["has_eval"]:
            if runner_threads != settings[0][0]:
                runner = open_model(ref, Path(request["path"]), threads=settings[0][0], precision=job["precision"], input_names=job["input_names"])
            evals = [arrays[f"eval_{i}"] for i in range(job["n_inputs"])]
            outs = [runner.run([e[j : j + 1] for e in evals])[0][0] for j in range(len(evals[0]))]
            np.save(out / "eval.npy", np.stack(outs))
        result = {
            "latency": latency,
            "baseline_rss_bytes": baseline,
            "peak_rss_bytes": peak,
            "input_names": list(runner.input_names),
            "output_names": list(runner.output_names),
            "confinement": {"complete": confinement.complete, "describe": confinement.describe()},
        }
    except MnnpipeError as exc:
        result = {"error": {"type": type(exc).__name__, "message": str(exc)}}
    (out / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1], int(sys.argv[2])))
