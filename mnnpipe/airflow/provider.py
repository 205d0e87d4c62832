"""Provider metadata Airflow reads through the `apache_airflow_provider` entry point.

Airflow calls this on every provider discovery (CLI, scheduler, workers), so it must stay cheap:
no Airflow, torch or step imports here.
"""

from __future__ import annotations

from typing import Any

from .. import __version__

INTEGRATION = "mnnpipe"


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "mnnpipe",
        "name": "mnnpipe",
        "description": "Compress PyTorch models for MNN: one operator per mnnpipe step (distill, prune, "
        "quantize, convert, benchmark), run in-process or in the step's container, and a deferrable "
        "sensor for new model versions under an S3 prefix.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": INTEGRATION,
                "external-doc-url": "https://github.com/alibaba/MNN",
                "tags": ["software"],
            }
        ],
        "operators": [{"integration-name": INTEGRATION, "python-modules": ["mnnpipe.airflow.operators"]}],
        "sensors": [{"integration-name": INTEGRATION, "python-modules": ["mnnpipe.airflow.sensors"]}],
        "triggers": [{"integration-name": INTEGRATION, "python-modules": ["mnnpipe.airflow.triggers"]}],
    }
