"""Translation of Ray's exceptions into mycellm's error tree at the actor boundary."""

from __future__ import annotations

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
