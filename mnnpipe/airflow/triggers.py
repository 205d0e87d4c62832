"""A trigger that fires when a new model version appears under a registry prefix.

It runs in Airflow's triggerer (asyncio); each check is a few blocking store calls, done in a
worker thread so the triggerer's event loop never blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from ..errors import MnnpipeError
from ..registry import next_version


class NewModelVersionTrigger(BaseTrigger):
    """Fire {"status": "found", "version": ..., "model_uri": ...} once `next_version` finds one.

    Fires {"status": "error", "message": ...} when the registry cannot be read; the sensor
    turns that into a task failure (and its retries).
    """

    def __init__(self, *, registry: str, model_filename: str, processed_marker: str, poke_interval: float = 60.0) -> None:
        super().__init__()
        self.registry = registry
        self.model_filename = model_filename
        self.processed_marker = processed_marker
        self.poke_interval = poke_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "registry": self.registry,
                "model_filename": self.model_filename,
                "processed_marker": self.processed_marker,
                "poke_interval": self.poke_interval,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while True:
            try:
                found = await asyncio.to_thread(next_version, self.registry, self.model_filename, self.processed_marker)
            except MnnpipeError as e:
                yield TriggerEvent({"status": "error", "message": str(e)})
                return
            if found is not None:
                yield TriggerEvent({"status": "found", **found.as_dict()})
                return
            self.log.info("no new model version under %s; next check in %ss", self.registry, self.poke_interval)
            await asyncio.sleep(self.poke_interval)
