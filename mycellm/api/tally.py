"""What one request did as the ingress saw it, turned into a ServedRequestRecord at the end."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

from mycellm.errors import MycellmError, RequestCancelledError
from mycellm.ledger.records import ServedRequestRecord
from mycellm.routing.ranking import Route
from mycellm.types import RequestId, Usage


class RequestTally:
    def __init__(self, request_id: RequestId, endpoint: str, model: str) -> None:
        self.request_id = request_id
        self.endpoint = endpoint
        self.model = model
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.route: Route | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.counted = False  # whether the answer's usage is known (a final chunk, or a whole result)
        self.delivered_bytes = 0  # text a stream sent to its reader (its usage may never come)
        self.outcome = "ok"
        self.error_code: str | None = None

    def mark_first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def count(self, usage: Usage) -> None:
        """The tokens of the answer, as its final chunk (or result) reported them."""
        self.prompt_tokens, self.completion_tokens = usage.prompt_tokens, usage.completion_tokens
        self.counted = True

    def fail(self, error: BaseException) -> None:
        if isinstance(error, RequestCancelledError | asyncio.CancelledError | GeneratorExit):
            self.outcome = "cancelled"
        elif isinstance(error, MycellmError) and error.status < 500:
            self.outcome, self.error_code = "client_error", error.code or error.error_type
        else:
            self.outcome = "engine_error"
            self.error_code = error.code if isinstance(error, MycellmError) else type(error).__name__

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    @property
    def time_to_first_token_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    def to_record(self) -> ServedRequestRecord | None:
        """The ledger record; None when the request never reached a route."""
        if self.route is None:
            return None
        first = self.time_to_first_token_s
        values: dict[str, Any] = {
            "request_id": self.request_id,
            "model": self.model,
            "endpoint": self.endpoint,
            "route_kind": self.route.kind,
            "route_target": self.route.target,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "time_to_first_token_ms": None if first is None else first * 1000,
            "duration_ms": self.elapsed_s * 1000,
            "outcome": self.outcome,
            "error_code": None if self.error_code is None else self.error_code[:64],  # the column's width
            "created_at": datetime.now(UTC),
        }
        return ServedRequestRecord.model_validate(values)
