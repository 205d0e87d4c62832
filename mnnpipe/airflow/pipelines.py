"""Task chains the bundled DAGs share: the compression steps wired through XCom.

Each step's spec takes its input model from the previous step's Result in XCom
(`{{ ti.xcom_pull(task_ids=...)['artifacts']['model.mnn']['uri'] }}`), so the chain works the
same whether the steps run in-process or in pods.
"""

from __future__ import annotations

from typing import Any

from . import config
from ..errors import SpecError
from .operators import KUBERNETES_EXTRA_MISSING, MnnStepOperator, kubernetes_provider_installed, operator_class


def pulled(task_id: str) -> str:
    """A Jinja expression for what task `task_id` pushed to XCom in this run. Pulled from the same
    map index as the task rendering it, so it works inside a mapped task group (one instance per
    model version) and outside one alike (both -1 there)."""
    return "ti.xcom_pull(task_ids='%s', map_indexes=ti.map_index)" % task_id


def artifact_uri(task_id: str, artifact: str) -> str:
    """A Jinja expression for the URI of `artifact` (a path relative to the step's output, e.g.
    'model.mnn') in the Result that task `task_id` pushed to XCom."""
    return "{{ %s['artifacts']['%s']['uri'] }}" % (pulled(task_id), artifact)


def step_operator(step: str, *, task_id: str | None = None, spec: dict[str, Any], **kwargs: Any) -> Any:
    """The step's task in the DAGs' execution mode: in-process, or its own deferrable pod
    (`mnnpipe.airflow.pod`) with the Kubernetes options from the environment."""
    execution = config.execution()
    if execution == "kubernetes":
        if not kubernetes_provider_installed():
            raise SpecError(KUBERNETES_EXTRA_MISSING)
        from .pod import pod_operator_class

        return pod_operator_class(step)(task_id=task_id or step, spec=spec, **{**config.kubernetes_options(), **kwargs})
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
    group: str = "",
) -> list[MnnStepOperator]:
    """convert -> quantize (full int8) -> benchmark, in the current DAG.

    `model_uri` and `output` may be templates; each step publishes under `{output}/{step}`.
    Returns the operators in order (`release_task` gates and releases their result). Inside a
    task group, `group` is its group_id (the prefix Airflow gives the task ids the specs pull from).
    """
    prefix = f"{group}." if group else ""
    convert = step_operator(
        "convert",
        spec={"model": {"uri": model_uri, "format": "torchscript"}, "inputs": [model_input], "output": f"{output}/convert"},
    )
    quantize = step_operator(
        "quantize",
        spec={
            "model": {"uri": artifact_uri(prefix + "convert", "model.mnn"), "format": "mnn"},
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
                "mnn-fp32": {"uri": artifact_uri(prefix + "convert", "model.mnn"), "format": "mnn"},
                "mnn-int8": {"uri": artifact_uri(prefix + "quantize", "model.mnn"), "format": "mnn"},
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


def release_task(*, found: Any, quantized: Any, benchmarked: Any, release_root: str, digest: str, max_accuracy_drop: float = 1.0) -> Any:
    """The gate and the release, after `compress_chain` (the same gate as KFP's, same budget units
    as quantize's `max_accuracy_drop`): publishes `{release_root}/{name}/{version}/{digest}/`,
    moves `{release_root}/{name}/latest.json` forward and emits `config.RELEASED_ASSET`.

    `found`, `quantized`, `benchmarked`: XComArgs of the version dict and the two steps' Results.
    """
    from airflow.sdk import get_current_context, task

    from .release import gate_spec

    @task(task_id="release", outlets=[config.RELEASED_ASSET])
    def release(found: dict[str, str], quantized: dict[str, Any], benchmarked: dict[str, Any], release_root: str, gate: dict[str, Any]) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowFailException

        from ..errors import SpecError, StepFailed
        from .release import gate_and_release

        try:
            result = gate_and_release(found=found, quantized=quantized, benchmarked=benchmarked, release_root=release_root, gate=gate)
        except (SpecError, StepFailed) as e:  # over budget stays over budget on every retry
            raise AirflowFailException(str(e)) from e
        context = get_current_context()
        context["outlet_events"][config.RELEASED_ASSET].extra = {
            "name": found.get("name", ""),
            "version": found["version"],
            "release": result["released"],
            "model_uri": result["artifacts"]["model.mnn"]["uri"],
            "latest_moved": result["latest_moved"],
        }
        return result

    return release(found, quantized, benchmarked, release_root, gate_spec(max_accuracy_drop, digest))


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
