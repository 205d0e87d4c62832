"""A fake step for tests: `echo` writes its input model's bytes to echo.mnn, in milliseconds.

It is a step like the bundled ones in every other way (a Spec, a Result, a run function that
reads its inputs through `ctx.local` and writes into `ctx.outdir`, one `register` call at the
end), so the tests of the runner, the cache, the manifest's lineage and the CLI's exit codes run
it instead of a conversion. It is also the sixth step of tests/unit/test_new_step.py: this one
module is all it takes for it to get a CLI, a JSON Schema, a KFP component, an Airflow operator
and a recipe section.

Registered in a test by the `echo_step` fixture (tests/conftest.py); in a subprocess by
`PYTHONPATH=tests/support MNNPIPE_STEP_MODULES=echo_step` (the fixture sets both).
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import Field

from mnnpipe.catalog import HandOff, register
from mnnpipe.errors import InputError, SpecError, StepFailed, StoreError, ToolError
from mnnpipe.specs import DatasetRef, ModelRef, StepResult, StepSpec

#: `fail` values and what each raises (the CLI's exit code in brackets).
FAILURES: dict[str, type[Exception]] = {
    "spec": SpecError,  # 2
    "input": InputError,  # 2
    "step": StepFailed,  # 1
    "tool": ToolError,  # 1
    "store": StoreError,  # 3
    "internal": RuntimeError,  # 1, "internal failure"
}
ARTIFACT = "echo.mnn"
PADDING = "pad.bin"  # sorts after echo.mnn: published after it


class Spec(StepSpec):
    """Write the input model's bytes to echo.mnn (a fake step for tests: no engine, milliseconds)."""

    kind: Literal["echo"] = "echo"
    model: ModelRef = Field(description="The model whose bytes are echoed.")
    data: DatasetRef | None = Field(None, description="A dataset whose file is an input too (its size is a metric); None: none.")
    repeat: int = Field(1, ge=1, le=64, description="How many times the model's bytes are written to echo.mnn.")
    note: str = Field("", max_length=200, description="Text recorded in the result (part of the cache key, as every field).")
    padding_bytes: int = Field(
        0, ge=0, le=512 * 2**20, description="Size of pad.bin, published after echo.mnn: a window to stop a run mid-publish."
    )
    fail: Literal["none", "spec", "input", "step", "tool", "store", "internal"] = Field(
        "none", description="After writing its files, raise this kind of error (exit 2, 2, 1, 1, 3, 1); none: succeed."
    )


class Result(StepResult):
    kind: Literal["echo"] = "echo"
    size_bytes: int = Field(description="Bytes of echo.mnn.")
    input_sha256: str = Field(description="sha256 of the model's bytes as the step read them.")
    note: str = Field("", description="The spec's note.")


def run(spec: Spec, ctx: Any) -> Result:
    data = ctx.local(spec.model.uri).read_bytes()
    body = data * spec.repeat
    (ctx.outdir / ARTIFACT).write_bytes(body)
    if spec.padding_bytes:
        (ctx.outdir / PADDING).write_bytes(b"\0" * spec.padding_bytes)
    metrics = {"size_bytes": float(len(body)), "repeat": float(spec.repeat)}
    if spec.data is not None and spec.data.uri:
        metrics["data_bytes"] = float(ctx.local(spec.data.uri).stat().st_size)
    if spec.fail != "none":
        raise FAILURES[spec.fail](f"echo: failing as asked (fail: {spec.fail})")
    return Result(size_bytes=len(body), input_sha256=hashlib.sha256(data).hexdigest(), note=spec.note, metrics=metrics)


register(name="echo", spec=Spec, result=Result, run=run, stage="quantize", model_input="model", hands_on=HandOff(ARTIFACT, "mnn"))
