"""Recorder: hands finished requests' records to the Ledger actor, off the response path, in order."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any

from actors.calls import call_actor
from mycellm.errors import MycellmError
from mycellm.ledger.records import ServedRequestRecord

logger = logging.getLogger(__name__)

RECORD_TIMEOUT_S = 30.0


class Recorder:
    """Owns a queue of records and the one task that drains it; ``record`` never blocks."""

    def __init__(self, ledger: Any) -> None:
        self._ledger = ledger
        self._records: asyncio.Queue[ServedRequestRecord] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def record(self, record: ServedRequestRecord) -> None:
        self._records.put_nowait(record)
        if self._task is None or self._task.done():
            # A task of its own, in a context of its own: a call made from the request's task is
            # cancelled with the request when its client leaves, and the record was lost.
            self._task = asyncio.get_running_loop().create_task(self._drain(), context=contextvars.Context())

    async def _drain(self) -> None:
        while not self._records.empty():
            record = self._records.get_nowait()
            try:
                await call_actor(self._ledger.record_request.remote(record), RECORD_TIMEOUT_S)
            except MycellmError as error:
                logger.warning("could not record %s: %s", record.request_id, error.message)
