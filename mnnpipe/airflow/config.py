"""Settings the bundled DAGs share, and where each comes from.

Each setting resolves, first match wins:
  1. the DAG run's param (trigger a run with {"artifact_prefix": "s3://..."}),
  2. the Airflow Variable `mnnpipe_<name>` (read at run time, never while parsing),
  3. the environment variable MNNPIPE_<NAME> of the process that parses the DAG,
  4. the embedded default: a folder under $AIRFLOW_HOME/mnnpipe, so the DAGs run on a laptop
     with no object store at all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from airflow.sdk import Asset, Param

from ..errors import SpecError
from .operators import EXECUTIONS

#: What a training pipeline emits after it publishes a model version (see dags/README.md).
NEW_MODEL_ASSET = Asset(name="mnnpipe_new_model_version", uri="mnnpipe://model-registry/new-version")

_DESCRIPTIONS = {
    "model_registry": "Path, file:// or s3:// prefix with one folder per model version: {registry}/{version}/model.pt",
    "artifact_prefix": "Path, file:// or s3:// prefix under which compressed models and reports are published",
}


def _home() -> Path:
    return Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow") / "mnnpipe"


def default(name: str) -> str:
    """Levels 3 and 4: $MNNPIPE_<NAME>, else the embedded local folder."""
    embedded = {"model_registry": str(_home() / "models"), "artifact_prefix": str(_home() / "artifacts")}
    if name not in embedded:
        raise KeyError(name)
    return os.environ.get(f"MNNPIPE_{name.upper()}") or embedded[name]


def params() -> dict[str, Param]:
    """Run params; empty means 'use the Variable, else the parse-time default'."""
    return {name: Param("", type="string", description=f"{desc}. Empty: Variable mnnpipe_{name}, else {default(name)}") for name, desc in _DESCRIPTIONS.items()}


def setting(name: str) -> str:
    """A Jinja expression for the setting (levels 1-4), to use inside templated spec strings."""
    return "{{ params.%s or var.value.get('mnnpipe_%s', %s) }}" % (name, name, json.dumps(default(name)))


def resolve(name: str, params: Mapping[str, Any]) -> str:
    """The setting's value inside a running task (levels 1-4), for Python tasks."""
    from airflow.sdk import Variable

    return params.get(name) or Variable.get(f"mnnpipe_{name}", default=default(name))


def execution() -> str:
    """How the DAGs' steps run: $MNNPIPE_AIRFLOW_EXECUTION, default 'kubernetes' (the step image,
    so torch never lands on an Airflow worker); 'in_process' for development and tests."""
    value = os.environ.get("MNNPIPE_AIRFLOW_EXECUTION", "kubernetes")
    if value not in EXECUTIONS:
        raise SpecError(f"MNNPIPE_AIRFLOW_EXECUTION: expected one of {', '.join(EXECUTIONS)}, got '{value}'")
    return value


def kubernetes_options() -> dict:
    """Operator arguments for execution='kubernetes', from the environment:
    MNNPIPE_K8S_NAMESPACE (default 'default'), MNNPIPE_K8S_S3_SECRET (a Secret holding
    AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY; default 'mnnpipe-s3'), and MNNPIPE_S3_ENDPOINT_URL
    passed on to the pod when set. In-process runs ignore these."""
    env = {k: os.environ[k] for k in ("MNNPIPE_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION") if os.environ.get(k)}
    return {
        "namespace": os.environ.get("MNNPIPE_K8S_NAMESPACE", "default"),
        "secret_env_from": [os.environ.get("MNNPIPE_K8S_S3_SECRET", "mnnpipe-s3")],
        "env_vars": env,
    }
