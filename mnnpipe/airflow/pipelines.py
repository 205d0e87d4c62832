"""Task chains the bundled DAGs share: the compression steps wired through XCom.

Each step's spec takes its input model from the previous step's Result in XCom
(`{{ ti.xcom_pull(task_ids=...)['artifacts']['model.mnn']['uri'] }}`), so the chain works the
same whether the steps run in-process or in pods.
"""

from __future__ import annotations

from typing import Any

from . import config
from .operators import MnnStepOperator, operator_class


def artifact_uri(task_id: str, artifact: str) -> str:
    """A Jinja expression for the URI of `artifact` (a path relative to the step's output, e.g.
    'model.mnn') in the Result that task `task_id` pushed to XCom."""
    return "{{ ti.xcom_pull(task_ids='%s')['artifacts']['%s']['uri'] }}" % (task_id, artifact)


def step_operator(step: str, *, task_id: str | None = None, spec: dict[str, Any], **kwargs: Any) -> MnnStepOperator:
    """The step's operator with the DAGs' execution mode and Kubernetes options."""
    execution = config.execution()
    if execution == "kubernetes":
        kwargs = {**config.kubernetes_options(), **kwargs}
    return operator_class(step)(task_id=task_id or step, spec=spec, execution=execution, **kwargs)


def compress_chain(
    *,
    model_uri: str,
    output: str,
    model_input: dict[str, Any],
    calibration: dict[str, Any],
    evaluation: dict[str, Any],
    max_accuracy_drop: float = 1.0,
    benchmark_iterations: int = 30,
) -> list[MnnStepOperator]:
    """convert -> quantize (full int8) -> benchmark, in the current DAG.

    `model_uri` and `output` may be templates; each step publishes under `{output}/{step}`.
    Returns the operators in order; the last one's marker `{output}/{last step}/manifest.json`
    tells the sensor a version is done.
    """
    convert = step_operator(
        "convert",
        spec={"model": {"uri": model_uri, "format": "torchscript"}, "inputs": [model_input], "output": f"{output}/convert"},
    )
    quantize = step_operator(
        "quantize",
        spec={
            "model": {"uri": artifact_uri("convert", "model.mnn"), "format": "mnn"},
            "mode": "full-int8",
            "calibration": calibration,
            "evaluation": evaluation,
            "calibration_samples": 64,
            "max_accuracy_drop": max_accuracy_drop,
            "output": f"{output}/quantize",
        },
    )
    benchmark = step_operator(
        "benchmark",
        spec=benchmark_spec(
            models={
                "source": {"uri": model_uri, "format": "torchscript"},
                "mnn-fp32": {"uri": artifact_uri("convert", "model.mnn"), "format": "mnn"},
                "mnn-int8": {"uri": artifact_uri("quantize", "model.mnn"), "format": "mnn"},
            },
            evaluation=evaluation,
            iterations=benchmark_iterations,
            output=f"{output}/benchmark",
        ),
    )
    chain = [convert, quantize, benchmark]
    for upstream, downstream in zip(chain, chain[1:]):
        upstream >> downstream
    return chain


def benchmark_spec(*, models: dict[str, dict[str, Any]], evaluation: dict[str, Any], iterations: int, output: str) -> dict[str, Any]:
    """Every model side by side on the evaluation set, compared with the fp32 .mnn."""
    return {
        "models": [{"label": label, "model": ref} for label, ref in models.items()],
        "dataset": evaluation,
        "threads": [1],
        "batch_sizes": [1],
        "warmup": 5,
        "iterations": iterations,
        "reference": "mnn-fp32",
        "output": output,
    }
