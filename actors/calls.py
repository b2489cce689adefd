"""Calling an actor: one timeout, and Ray's exceptions turned into mycellm's error tree."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import ray

from mycellm.errors import EngineError, MycellmError, RequestCancelledError


def unwrap_ray_error(error: ray.exceptions.RayError) -> MycellmError:
    """The MycellmError an actor raised, or an EngineError for a dead or unreachable actor."""
    if isinstance(error, ray.exceptions.RayTaskError):
        cause = error.cause
        if isinstance(cause, MycellmError):
            return cause
        return EngineError(f"an actor failed: {type(cause).__name__}: {cause}")
    if isinstance(error, ray.exceptions.TaskCancelledError):
        # Serve cancels the calls a request made when its client leaves: a cancellation, not a
        # failure of the route (which would be retried elsewhere and counted against it).
        return RequestCancelledError("the call was cancelled")
    return EngineError(f"an actor is unavailable: {type(error).__name__}")


async def call_actor(reference: Any, timeout_s: float) -> Any:
    """Await an actor call (an ObjectRef) for at most ``timeout_s``; errors are mycellm's."""
    try:
        return await asyncio.wait_for(reference, timeout=timeout_s)
    except TimeoutError as error:
        raise EngineError(f"no answer within {timeout_s:.0f} s") from error
    except ray.exceptions.RayError as error:
        raise unwrap_ray_error(error) from error


def cancel_quietly(reference_factory: Any, *args: Any) -> None:
    """Fire a best-effort call (a cancellation) whose answer nobody waits for."""
    with contextlib.suppress(ray.exceptions.RayError):  # the actor is gone: nothing left to cancel
        reference_factory.remote(*args)


class ActorMethods:
    """The async methods of ``protocol``, each one a call of the actor's method of the same name.

    Every call goes through ``call_actor`` (one timeout, Ray's errors as mycellm's); arguments and
    answers pass unchanged (with ``bound`` keywords added), so what a method means is the actor's,
    not this adapter's.
    """

    def __init__(self, actor: Any, protocol: type, timeout_s: float, **bound: Any) -> None:
        self._actor = actor
        self._timeout_s = timeout_s
        self._bound = bound  # keyword arguments added to every call (the network of a book)
        self._names = frozenset(
            name for name, value in vars(protocol).items() if not name.startswith("_") and callable(value)
        )

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        if name.startswith("_") or name not in self._names:
            raise AttributeError(name)
        method = getattr(self._actor, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await call_actor(method.remote(*args, **kwargs, **self._bound), self._timeout_s)

        return call
