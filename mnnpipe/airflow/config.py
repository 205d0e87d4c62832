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
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import Asset, Param

from ..errors import SpecError
from .operators import EXECUTIONS, PULL_POLICIES

#: What a training pipeline emits after it publishes a model version (see dags/README.md).
NEW_MODEL_ASSET = Asset(name="mnnpipe_new_model_version", uri="mnnpipe://model-registry/new-version")
#: What the bundled DAGs emit once a compressed model passed the gate and was released; extra:
#: {"name", "version", "release", "model_uri", "latest_moved"}. Deployment or A/B DAGs schedule on it.
RELEASED_ASSET = Asset(name="mnnpipe_compressed_model_released", uri="mnnpipe://releases/compressed-model")

#: The file a model version holds in the registry, `{model_registry}/{version}/model.pt`, and how
#: it is read: TorchScript (the hand-off contract, dags/README.md). The DAGs' recipes read their
#: source model so (`registry_recipe`).
REGISTRY_MODEL_FILE = "model.pt"
REGISTRY_MODEL: dict[str, Any] = {"format": "torchscript"}


def registry_recipe(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """`recipe` reading its source model as the registry holds it (TorchScript)."""
    return {**recipe, "model": dict(REGISTRY_MODEL)}


_DESCRIPTIONS = {
    "model_registry": "Path, file:// or s3:// prefix with one folder per model version: {registry}/{version}/model.pt",
    "artifact_prefix": "Path, file:// or s3:// prefix under which compressed models and reports are published",
}


def path_segment(text: str) -> str:
    """`text` as one safe path segment: a run id such as `manual__2026-11-30T04:05:06+00:00`
    becomes `manual__2026-11-30T04-05-06-00-00` (no ':' or '+' in S3 keys and file names)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-.") or "run"


#: Task defaults of every bundled DAG: a store hiccup gets one retry (bad specs and inputs fail
#: at once regardless, see operators), and no step runs unbounded.
DEFAULT_ARGS = {"retries": 1, "retry_delay": timedelta(minutes=1), "execution_timeout": timedelta(hours=2)}

#: Jinja filters every bundled DAG registers (`user_defined_filters=config.FILTERS`).
FILTERS = {"path_segment": path_segment}
#: Template of the current run's own path segment. The run id exists for every run, manual ones
#: included (Airflow 3 gives a manual trigger no logical date, so `{{ ds }}` is undefined there),
#: and differs between a manual and a scheduled run on the same day: no run overwrites another's outputs.
RUN_SEGMENT = "{{ run_id | path_segment }}"


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
    """Pod arguments for execution='kubernetes', from the environment of the process parsing the DAG:

    - MNNPIPE_K8S_NAMESPACE (default 'default'), MNNPIPE_K8S_SERVICE_ACCOUNT (default: the
      namespace's default account), MNNPIPE_K8S_IMAGE_PULL_POLICY (default 'IfNotPresent');
    - MNNPIPE_K8S_S3_SECRET: a Secret holding AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (default
      'mnnpipe-s3'); empty for IRSA / workload identity, where the service account carries the role;
    - MNNPIPE_K8S_S3_ENDPOINT_URL: the S3 endpoint as the POD reaches it (its own setting: the
      scheduler's MNNPIPE_S3_ENDPOINT_URL, often a localhost or port-forward, is not copied);
      MNNPIPE_K8S_AWS_REGION likewise.
    In-process runs ignore these.
    """
    env = {target: os.environ[source] for source, target in (("MNNPIPE_K8S_S3_ENDPOINT_URL", "MNNPIPE_S3_ENDPOINT_URL"), ("MNNPIPE_K8S_AWS_REGION", "AWS_DEFAULT_REGION")) if os.environ.get(source)}
    pull = os.environ.get("MNNPIPE_K8S_IMAGE_PULL_POLICY", "IfNotPresent")
    if pull not in PULL_POLICIES:
        raise SpecError(f"MNNPIPE_K8S_IMAGE_PULL_POLICY: expected one of {', '.join(PULL_POLICIES)}, got '{pull}'")
    secret = os.environ.get("MNNPIPE_K8S_S3_SECRET", "mnnpipe-s3")
    options = {
        "namespace": os.environ.get("MNNPIPE_K8S_NAMESPACE", "default"),
        "secret_env_from": [secret] if secret else [],
        "env_vars": env,
        "image_pull_policy": pull,
    }
    if os.environ.get("MNNPIPE_K8S_SERVICE_ACCOUNT"):
        options["service_account_name"] = os.environ["MNNPIPE_K8S_SERVICE_ACCOUNT"]
    return options
