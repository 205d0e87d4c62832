"""Latency statistics: time a loaded model's `run` call after warm-up.

    latency = time_runner(runner, [x], warmup=10, iterations=30)   # runner: engines.runtimes.ModelRunner
    latency.p50_ms
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from mnnpipe.engines.runtimes import ModelRunner

__all__ = ["Latency", "time_runner"]


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
