"""Fixtures of the federation tests: one authority key and its default and named networks, and
the PeerServices a test starts (stopped after it)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mycellm.federation.descriptions import (
    JoinPolicy,
    NetworkDescription,
    issue_network_description,
)
from mycellm.network.service import PeerService
from tests.federation.kit import NOW, new_key


@pytest.fixture(scope="module")
def authority() -> Ed25519PrivateKey:
    return new_key()


@pytest.fixture(scope="module")
def description(authority: Ed25519PrivateKey) -> NetworkDescription:
    return issue_network_description(
        authority,
        name="home",
        visibility="public",
        bootstrap=["seed.example.org:8421", "10.0.0.1:8421", "[::1]:9000"],
        model_tiers={"smollm2": "tiny", "qwen2.5-7b": "fast"},
        join_policy=JoinPolicy(max_joins_per_address_per_hour=3, max_joins_per_address_per_day=10),
        serial=1,
        now=NOW,
    )


@pytest.fixture(scope="module")
def named(authority: Ed25519PrivateKey) -> NetworkDescription:
    return issue_network_description(authority, name="lab", default=False, serial=1, now=NOW)


@pytest.fixture
async def services() -> AsyncIterator[list[PeerService]]:
    started: list[PeerService] = []
    yield started
    for service in started:
        await service.stop()
