"""Daily budgets of API keys at the ingress: reserve a request's worst-case price before any work, settle its real price at the end.

The worst case of a generation is its ``max_tokens`` (the model's context window when none is
given) and a prompt of at most one token per byte of what the request sends (every token of a
byte-level or byte-fallback vocabulary covers at least one byte) plus a margin for the chat
template, capped at the context window, priced by the price table at the model's tier; with
failover candidates, the dearest of them. The reservation is the Ledger's, atomic in the database
(``mycellm.ledger.api_keys``), so concurrent requests never reserve past the budget; a refusal is
a 402 before anything ran. At the end (an answer, an error, a client that left) the reservation
is released and the real price counted: the usage's, or, when a stream ended without usage, the
text it delivered at one token per byte, at most the reservation. A request whose answer was
dropped before it started streaming settles (at nothing delivered) when its tally is collected.
Keys without a budget reserve nothing and only count what they spent.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mycellm.api.auth import Caller
from mycellm.api.tally import RequestTally
from mycellm.errors import BudgetExceededError, MycellmError
from mycellm.ledger.pricing import PriceTable
from mycellm.routing.ranking import Route
from mycellm.types import EmbeddingRequest, GenerationRequest, ModelInfo

logger = logging.getLogger(__name__)

UNKNOWN_CONTEXT_TOKENS = 32_768  # a model that does not say its window (an upstream) is priced as this
TEMPLATE_MARGIN_TOKENS = 256  # the chat template's own tokens (roles, markers, a default system prompt)
TEXT_TOKEN_MARGIN = 2  # begin and end tokens around one embedding input

# (key id, request id, micro-credits, now) -> reserved; (..., reserved) -> settled
Reserve = Callable[[str, str, int, float], Awaitable[bool]]
Settle = Callable[[str, str, int, float, bool], Awaitable[bool]]


def context_of(model: ModelInfo) -> int:
    return model.context_tokens or UNKNOWN_CONTEXT_TOKENS


def generation_bounds(request: GenerationRequest, model: ModelInfo) -> tuple[int, int]:
    """The most prompt and completion tokens ``request`` can use on ``model``."""
    context = context_of(model)
    sent = [request.messages, request.prompt, request.tools, request.response_format, request.tool_choice]
    prompt_bytes = len(json.dumps(sent, ensure_ascii=False, default=str).encode())
    completion = min(request.max_tokens or context, context)
    return min(prompt_bytes + TEMPLATE_MARGIN_TOKENS, context), completion


def embedding_bound(request: EmbeddingRequest, model: ModelInfo) -> int:
    """The most prompt tokens the inputs of ``request`` can use on ``model``."""
    context = context_of(model)
    sizes = (
        len(item) if isinstance(item, tuple) else len(item.encode()) + TEXT_TOKEN_MARGIN
        for item in request.inputs
    )
    return sum(min(size, context) for size in sizes)


@dataclass
class _Hold:
    key_id: str
    amount: int
    reserved: bool
    prompt: int
    completion: int
    prices: PriceTable
    finalizer: weakref.finalize | None = None


class BudgetKeeper:
    """The reservations of the requests running at one ingress, and their settlement off the response path."""

    def __init__(
        self, prices: PriceTable, reserve: Reserve, settle: Settle, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._prices = prices
        self._reserve = reserve
        self._settle = settle
        self._clock = clock
        self._holds: dict[str, _Hold] = {}
        self._settlements: asyncio.Queue[tuple[str, str, int, bool]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._holds)

    def worst_case(
        self,
        routes: list[Route],
        request: GenerationRequest | EmbeddingRequest,
        prices: PriceTable | None = None,
    ) -> tuple[int, int, int]:
        """(price, prompt tokens, completion tokens) of the dearest candidate route, priced by
        ``prices`` (the request's network's; None: the node's own table)."""
        prices = prices or self._prices
        worst = (0, 0, 0)
        for route in routes:
            model = route.model
            if isinstance(request, EmbeddingRequest):
                prompt, completion = embedding_bound(request, model), 0
            else:
                prompt, completion = generation_bounds(request, model)
            price = prices.price(model.name, model.tier, prompt, completion)
            worst = max(worst, (price, prompt, completion))
        return worst

    async def hold(
        self,
        served: RequestTally,
        caller: Caller | None,
        routes: list[Route],
        request: GenerationRequest | EmbeddingRequest,
        prices: PriceTable | None = None,
    ) -> None:
        """Reserve the worst-case price of a key's request (in the prices of its network);
        BudgetExceededError (402) if it does not fit."""
        if caller is None or caller.key_id is None:
            return
        prices = prices or self._prices
        amount, prompt, completion = self.worst_case(routes, request, prices)
        budgeted = caller.budget_micro is not None
        hold = _Hold(caller.key_id, amount, budgeted, prompt, completion, prices)
        # Held before the Ledger answers: a request cancelled meanwhile still releases what it got.
        self._holds[served.request_id] = hold
        hold.finalizer = weakref.finalize(
            served, self._orphaned, served.request_id, asyncio.get_running_loop()
        )
        hold.finalizer.atexit = False
        if not budgeted:
            return
        try:
            await self._reserve(caller.key_id, served.request_id, amount, self._clock())
        except BudgetExceededError:
            self._drop(served.request_id)  # refused: nothing was reserved
            raise

    def settle(self, served: RequestTally) -> None:
        """Release the request's reservation and count its real price (idempotent, never blocks)."""
        hold = self._drop(served.request_id)
        if hold is not None:
            self._enqueue(served.request_id, hold, self.price_of(served, hold))

    def price_of(self, served: RequestTally, hold: _Hold) -> int:
        route = served.route
        if route is None:
            return 0
        model = route.model
        if served.counted:
            return hold.prices.price(model.name, model.tier, served.prompt_tokens, served.completion_tokens)
        if served.delivered_bytes:
            delivered = hold.prices.price(
                model.name, model.tier, hold.prompt, min(served.delivered_bytes, hold.completion)
            )
            return min(delivered, hold.amount)
        return 0

    def _drop(self, request_id: str) -> _Hold | None:
        hold = self._holds.pop(request_id, None)
        if hold is not None and hold.finalizer is not None:
            hold.finalizer.detach()
        return hold

    def _orphaned(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        """The tally of a held request was collected unsettled (its stream never started)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: the node is going away
            loop.call_soon_threadsafe(self._release_orphan, request_id)

    def _release_orphan(self, request_id: str) -> None:
        hold = self._holds.pop(request_id, None)
        if hold is not None:
            self._enqueue(request_id, hold, 0)

    def _enqueue(self, request_id: str, hold: _Hold, actual: int) -> None:
        self._settlements.put_nowait((hold.key_id, request_id, actual, hold.reserved))
        if self._task is None or self._task.done():
            # A task of its own, in a context of its own: the request's task may be cancelled.
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._drain(), context=contextvars.Context())

    async def _drain(self) -> None:
        while not self._settlements.empty():
            key_id, request_id, actual, reserved = self._settlements.get_nowait()
            try:
                await self._settle(key_id, request_id, actual, self._clock(), reserved)
            except MycellmError as error:
                logger.warning("could not settle %s for API key %s: %s", request_id, key_id, error.message)
