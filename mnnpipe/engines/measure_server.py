"""The measuring server that engines.measure.MeasureServer starts: `python -m mnnpipe.engines.measure_server JOB REPLY_FD`.

It reads the job (settings, inputs) once, then takes one request line per model
(engines.line_child): it imports the runtime the model needs (once per process), forks a process
that confines itself, times every setting and measures peak memory (engines.peak_rss), and answers
with the forked process's exit status. The measurements travel as files in the model's folder.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from mnnpipe.engines.line_child import confine, error_reply, serve_lines
from mnnpipe.engines.measure import setting_key
from mnnpipe.engines.mnn import signal_name
from mnnpipe.engines.peak_rss import map_again, mapped_file_pages, peak_rss_bytes, reset_peak_rss
from mnnpipe.engines.runtimes import open_model
from mnnpipe.engines.timing import time_runner
from mnnpipe.errors import MnnpipeError
from mnnpipe.specs import ModelRef


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

    def handle(request: dict[str, Any]) -> dict[str, Any]:
        try:
            _import_runtime(request["ref"].get("format") or "")
        except ImportError:
            pass  # the forked process fails the same way and reports it
        mapped = mapped_file_pages()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the model's own process: never returns
            code = 1
            try:
                os.close(reply_fd)
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                map_again(mapped)
                code = _measure_one(job, arrays, request)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        return {"status": _wait(pid, job["timeout_s"])}

    return serve_lines(reply_fd, handle)


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
    out = Path(request["out"])
    try:
        ref = ModelRef.model_validate(request["ref"])
        _import_runtime(ref.format)
        baseline = reset_peak_rss()  # before confining: the reset writes /proc/self/clear_refs
        confinement = confine([out])
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
        peak = peak_rss_bytes()
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
            "confinement": confinement,
        }
    except MnnpipeError as exc:
        result = error_reply(exc)
    (out / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1], int(sys.argv[2])))
