"""Values the ledger stores and returns."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Outcome = Literal["ok", "cancelled", "client_error", "engine_error"]
RouteKind = Literal["local", "peer", "chain", "fleet"]


class ServedRequestRecord(BaseModel):
    """One request this node answered (or failed to), as the ingress saw it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    request_id: str = Field(min_length=1, max_length=128)
    model: str = Field(max_length=256)
    endpoint: Literal["chat", "completion", "embedding"]
    route_kind: RouteKind
    route_target: str = Field(max_length=256)
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    time_to_first_token_ms: float | None = Field(default=None, ge=0)
    duration_ms: float = Field(ge=0)
    outcome: Outcome
    error_code: str | None = Field(default=None, max_length=64)
    created_at: datetime


class RequestTotals(BaseModel):
    model_config = ConfigDict(frozen=True)

    requests: int
    prompt_tokens: int
    completion_tokens: int
    failures: int
