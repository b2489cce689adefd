"""Checks of the node API's query parameters, with the error messages the routes answer (400)."""

from __future__ import annotations

import re

from mycellm.api.networks import MAX_NAME
from mycellm.api.openapi import MAX_OFFSET, MAX_PAGE, RECEIPT_ROLES
from mycellm.errors import InvalidRequestError


def account_param(account: str | None) -> str | None:
    if account is not None and not re.fullmatch(r"[0-9a-f]{64}", account):
        raise InvalidRequestError(
            "account must be an account id (64 lowercase hex characters)", param="account"
        )
    return account


def check_page(limit: int, offset: int = 0) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequestError(f"limit must be between 1 and {MAX_PAGE}", param="limit")
    if offset < 0:
        raise InvalidRequestError("offset must not be negative", param="offset")
    if offset > MAX_OFFSET:
        raise InvalidRequestError(f"offset must be at most {MAX_OFFSET}", param="offset")


def check_role(role: str) -> None:
    if role not in RECEIPT_ROLES:
        raise InvalidRequestError("role must be any, consumer or seeder", param="role")


def check_network(network: str | None) -> str | None:
    if network is not None and not 1 <= len(network) <= MAX_NAME:
        raise InvalidRequestError(
            f"network is a name or an id of 1 to {MAX_NAME} characters", param="network"
        )
    return network
