"""Which network an HTTP request runs in.

The caller's API key decides when it names a network; else the body's ``mycellm.network``; else
the ``X-Mycellm-Network`` header; else the node's default network. A key's caller may name its
own network again, never another (403). A name that is none of the node's networks is a 404
before any work; a node in no network serves requests that name none on its own workers only.
"""

from __future__ import annotations

from mycellm.api.auth import Caller
from mycellm.errors import InvalidRequestError, PermissionDeniedError
from mycellm.routing.directory import NetworkEntry, RouteSnapshot

NETWORK_HEADER = "x-mycellm-network"
MAX_NAME = 128


def choose_network(
    snapshot: RouteSnapshot,
    caller: Caller | None,
    body_network: str | None = None,
    header_network: str | None = None,
) -> NetworkEntry | None:
    if header_network is not None and not 1 <= len(header_network) <= MAX_NAME:
        raise InvalidRequestError(
            f"the {NETWORK_HEADER} header names a network in 1 to {MAX_NAME} characters", param=NETWORK_HEADER
        )
    asked = (
        snapshot.network(body_network, "mycellm.network")
        if body_network
        else snapshot.network(header_network, NETWORK_HEADER)
        if header_network
        else None
    )
    if caller is not None and caller.network:
        bound = snapshot.network(caller.network, "api_key")
        if asked is not None and asked.network_id != bound.network_id:
            raise PermissionDeniedError(
                f"this API key is for network {bound.name} ({bound.network_id[:12]}),"
                f" not {asked.name} ({asked.network_id[:12]})",
                param="mycellm.network" if body_network else NETWORK_HEADER,
                code="wrong_network",
            )
        return bound
    return asked if asked is not None else snapshot.default_network()
