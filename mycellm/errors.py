"""The one exception tree of mycellm and its mapping to OpenAI-style HTTP errors.

MycellmError
├── ConfigError                 bad configuration (CLI exits 2)
├── IdentityError               unreadable, tampered or mismatched key/certificate files
├── FederationError             403: a network's signed value (description, membership, invite) refused
├── MembershipError             403: the authority's books refuse an invite, a join or a member (429: join rate)
├── AuthenticationError         401: no API key where one is needed, or one that is unknown, wrong, revoked or expired
├── PermissionDeniedError       403: a valid API key without the scope the endpoint needs
├── RateLimitedError            429: a key over its requests per minute, or a source locked out after failures
├── InvalidRequestError         400: a request the OpenAI API would reject (names the field)
│   ├── ContextLengthError      400: prompt does not fit the model's context window
│   └── UnsupportedParameterError 400: a parameter this node/engine does not implement
├── ModelNotFoundError          404: no route serves the model
├── RoutingConstraintError      422: routing options that no route can satisfy
├── PaymentRequiredError        402: the consumer's balance does not cover the price
│   └── BudgetExceededError     402: an API key's daily budget does not cover the request's worst-case price
├── ReceiptError                400: a receipt that is forged, tampered, replayed or unjustified
├── EngineError                 503: an engine failed or is not ready
│   └── UpstreamError           503: an OpenAI-compatible upstream failed
│   └── PeerError               503: a peer link failed, was refused or answered with an error
├── NoRouteError                503: the model is known but no route is healthy now
├── ProtocolError               a QUIC frame that breaks the wire protocol (answered with an error frame)
└── RequestCancelledError       the client went away; never sent to a client

Every error carries the HTTP status, the OpenAI error ``type`` and ``code`` and, where a single
field is at fault, ``param``. Errors cross Ray actor boundaries, so they pickle by their
constructor arguments.
"""

from __future__ import annotations

from typing import Any


class MycellmError(Exception):
    """Root of every error raised by mycellm."""

    status: int = 500
    error_type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments do not survive the default exception pickling.
        return (_rebuild_error, (type(self), self.message, self.param, self.code))

    def to_openai(self) -> dict[str, Any]:
        """The body of an OpenAI-style error response."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


def _rebuild_error(
    cls: type[MycellmError], message: str, param: str | None, code: str | None
) -> MycellmError:
    error = cls.__new__(cls)
    MycellmError.__init__(error, message, param=param, code=code)
    return error


class ConfigError(MycellmError):
    """Configuration that cannot be used; ``param`` names the field."""

    error_type = "config_error"


class IdentityError(MycellmError):
    """Key or certificate files that are missing, unreadable or do not verify."""

    error_type = "identity_error"


class FederationError(MycellmError):
    """A network's signed value that is malformed, forged, expired, for another network or member.

    ``code`` says which: ``malformed``, ``bad_signature``, ``wrong_network``, ``not_yet_valid``,
    ``expired``, ``wrong_member``, ``revoked``, ``conflict``, ``full``, ``used_up``.
    """

    status = 403
    error_type = "permission_error"
    code = "federation_refused"


class MembershipError(MycellmError):
    """The authority's books refuse a redemption, a join or a change of a member; nothing changed.

    ``code``: ``invite_unknown``, ``invite_expired``, ``invite_used_up``, ``invite_revoked``,
    ``invite_bound`` (the invite names another account), ``membership_revoked``,
    ``membership_unknown``; ``join_rate_limited`` is raised by the ledger's subclass with status 429.
    """

    status = 403
    error_type = "permission_error"
    code = "membership_refused"


class AuthenticationError(MycellmError):
    """No API key where the node needs one, or a key it does not accept; ``code`` says which."""

    status = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDeniedError(MycellmError):
    """A valid API key that lacks the scope of the endpoint it called."""

    status = 403
    error_type = "permission_error"
    code = "insufficient_scope"


class RateLimitedError(MycellmError):
    """Too many requests: ``retry_after_s`` says when to try again (sent as Retry-After)."""

    status = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, retry_after_s: float = 1.0
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.retry_after_s = retry_after_s


class InvalidRequestError(MycellmError):
    status = 400
    error_type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    code = "context_length_exceeded"


class UnsupportedParameterError(InvalidRequestError):
    code = "unsupported_parameter"


class ModelNotFoundError(MycellmError):
    status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class NetworkNotFoundError(MycellmError):
    status = 404
    error_type = "invalid_request_error"
    code = "network_not_found"


class RoutingConstraintError(MycellmError):
    status = 422
    error_type = "invalid_request_error"
    code = "routing_constraint"


class PaymentRequiredError(MycellmError):
    status = 402
    error_type = "insufficient_quota"
    code = "insufficient_credits"


class BudgetExceededError(PaymentRequiredError):
    code = "budget_exceeded"


class ReceiptError(MycellmError):
    status = 400
    error_type = "invalid_request_error"
    code = "receipt_invalid"


class EngineError(MycellmError):
    status = 503
    error_type = "server_error"
    code = "engine_unavailable"


class UpstreamError(EngineError):
    code = "upstream_error"


class PeerError(EngineError):
    code = "peer_unavailable"


class ProtocolError(MycellmError):
    """A frame that breaks the wire protocol; ``code`` is the wire error code sent back.

    ``recoverable`` is False when the stream cannot be read further (framing is lost).
    """

    error_type = "protocol_error"
    code = "bad_frame"

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, recoverable: bool = False
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.recoverable = recoverable


class NoRouteError(MycellmError):
    status = 503
    error_type = "server_error"
    code = "no_route"


class RequestCancelledError(MycellmError):
    status = 499
    error_type = "cancelled"
    code = "cancelled"
