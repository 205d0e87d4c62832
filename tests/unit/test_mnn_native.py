"""engines.mnn_native: reading MNN's benchmark.out, and (opt-in) timing with a source-built MNN.

The timing test needs the runtime scripts/build-mnn.sh builds: set MNNPIPE_MNN_BENCHMARK to its
bin/benchmark.out to run it (like the container test, it is skipped otherwise)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mnnpipe.engines.mnn_native import ENV, NativeTiming, native_tool, parse_benchmark_output, time_native
from mnnpipe.errors import InputError

# Captured from benchmark.out of MNN 3.6.1 (format string in benchmark/benchmark.cpp, displayStats).
_OUTPUT = """MNN benchmark
Forward type: CPU thread=1 precision=0 sparsity=0 sparseBlockOC=1 testQuantizedModel=0 enableKleidiAI=0
--------> Benchmarking... loop = 10, warmup = 2
[-INFO-]: precision!=2, use fp32 inference.
[ - ] model.mnn                   max =   12.500 ms  min =    9.750 ms  avg =   10.125 ms
"""


def test_parse_benchmark_output() -> None:
    assert parse_benchmark_output(_OUTPUT) == {"model.mnn": NativeTiming(9.75, 10.125, 12.5)}
    assert parse_benchmark_output("nothing timed") == {}


def test_tool_setting(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert native_tool() is None
    monkeypatch.setenv(ENV, str(tmp_path / "missing"))
    with pytest.raises(InputError, match=ENV):
        native_tool()


@pytest.mark.skipif(not os.environ.get(ENV), reason=f"set {ENV} to a benchmark.out built by scripts/build-mnn.sh")
def test_source_built_runtime_times_a_model(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from mnnpipe.engines import mnn as E

    onnx_path = tmp_path / "m.onnx"
    torch.onnx.export(torch.nn.Conv2d(3, 8, 3).eval(), torch.randn(1, 3, 32, 32), str(onnx_path), dynamo=False, input_names=["x"])
    E.convert_onnx_to_mnn(onnx_path, tmp_path / "m.mnn")
    timing = time_native(native_tool(), tmp_path / "m.mnn", threads=1, warmup=1, iterations=3)
    assert 0 < timing.min_ms <= timing.avg_ms <= timing.max_ms
