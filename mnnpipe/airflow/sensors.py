"""Wait for a new model version under a registry prefix (deferrable by default).

    MnnNewModelVersionSensor(
        task_id="wait_for_new_model",
        registry="s3://models/digits",                       # {registry}/{version}/model.pt
        processed_marker="s3://artifacts/digits/{version}/benchmark/manifest.json",
    )

Returns {"version": ..., "model_uri": ...} (XCom) for downstream specs to template in. A version
counts as new until its `processed_marker` exists, so the sensor needs no state of its own and a
failed compression run is picked up again by the next one. See `registry` for which version wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue

from ..errors import SpecError
from ..specs import check_uri
from ..registry import next_version
from .triggers import NewModelVersionTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context


class MnnNewModelVersionSensor(BaseSensorOperator):
    """Succeed with the newest unprocessed model version under `registry`.

    :param registry: path, file:// or s3:// prefix holding one folder per model version.
    :param processed_marker: URI with a `{version}` placeholder; the version is done once it exists.
    :param model_filename: the model file inside a version folder.
    :param deferrable: wait in the triggerer instead of holding a worker slot.
    """

    template_fields: Sequence[str] = ("registry", "processed_marker", "model_filename")
    ui_color = "#e8f4e4"

    def __init__(
        self,
        *,
        registry: str,
        processed_marker: str,
        model_filename: str = "model.pt",
        deferrable: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if "{version}" not in processed_marker:
            raise SpecError(f"processed_marker must contain '{{version}}', got '{processed_marker}'")
        if not model_filename or "/" in model_filename:
            raise SpecError(f"model_filename must be a file name without '/', got '{model_filename}'")
        self.registry = registry
        self.processed_marker = processed_marker
        self.model_filename = model_filename
        self.deferrable = deferrable

    def _check_rendered(self) -> None:
        try:
            check_uri(self.registry, "registry")
            check_uri(self.processed_marker.replace("{version}", "v"), "processed_marker")
        except ValueError as e:
            raise SpecError(str(e)) from None

    def poke(self, context: Context) -> PokeReturnValue:
        self._check_rendered()
        found = next_version(self.registry, self.model_filename, self.processed_marker)
        if found is not None:
            self.log.info("new model version %s at %s", found.version, found.model_uri)
        return PokeReturnValue(is_done=found is not None, xcom_value=found.as_dict() if found else None)

    def execute(self, context: Context) -> Any:
        if not self.deferrable:
            return super().execute(context)
        first = self.poke(context)  # no deferral round trip when the version is already there
        if first.is_done:
            return first.xcom_value
        self.defer(
            trigger=NewModelVersionTrigger(
                registry=self.registry,
                model_filename=self.model_filename,
                processed_marker=self.processed_marker,
                poke_interval=self.poke_interval,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.timeout),
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, str]:
        if event.get("status") != "found":
            from airflow.sdk.exceptions import AirflowException

            raise AirflowException(f"watching {self.registry} failed: {event.get('message', event)}")
        return {key: value for key, value in event.items() if key != "status"}  # same dict as a poke returns
