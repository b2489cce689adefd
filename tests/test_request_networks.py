"""Which network an HTTP request runs in: the key's, else the body's, else the header's, else the default."""

from __future__ import annotations

import pytest

from mycellm.api.auth import Caller
from mycellm.api.networks import choose_network
from mycellm.config import PriceSettings
from mycellm.errors import InvalidRequestError, NetworkNotFoundError, PermissionDeniedError
from mycellm.routing.directory import NetworkEntry, RouteSnapshot
from mycellm.routing.ranking import Route
from mycellm.types import ModelInfo, NetworkId

ONE = NetworkEntry(NetworkId("1" * 64), "one", PriceSettings())
TWO = NetworkEntry(NetworkId("2" * 64), "two", PriceSettings(initial_grant=5.0))
TWIN = NetworkEntry(NetworkId("2" * 8 + "3" * 56), "one", PriceSettings())  # a second network called one
SNAPSHOT = RouteSnapshot((), (ONE, TWO), ONE.network_id)


def keyed(network: str | None) -> Caller:
    return Caller("k" * 16, frozenset({"inference"}), network=network)


def test_the_key_then_the_body_then_the_header_then_the_default() -> None:
    assert choose_network(SNAPSHOT, None) == ONE
    assert choose_network(SNAPSHOT, None, header_network="two") == TWO
    assert choose_network(SNAPSHOT, None, "two", "one") == TWO  # the body wins over the header
    assert choose_network(SNAPSHOT, keyed(TWO.network_id)) == TWO
    assert choose_network(SNAPSHOT, keyed("two"), "two", "two") == TWO  # its own network again
    assert choose_network(SNAPSHOT, keyed(None), header_network="two") == TWO  # a key for no network
    assert choose_network(RouteSnapshot(), None) is None  # a node in no network: local only


def test_ids_and_prefixes_name_networks_and_ambiguity_is_refused() -> None:
    assert choose_network(SNAPSHOT, None, TWO.network_id) == TWO
    assert choose_network(SNAPSHOT, None, "22222222") == TWO
    with pytest.raises(NetworkNotFoundError):
        choose_network(SNAPSHOT, None, "2222")  # a prefix under 8 characters names nothing
    twins = RouteSnapshot((), (ONE, TWO, TWIN), ONE.network_id)
    with pytest.raises(NetworkNotFoundError, match="no single network called 'one'"):
        choose_network(twins, None, "one")
    with pytest.raises(NetworkNotFoundError):
        choose_network(twins, None, "22222222")  # TWO and TWIN both start with it
    assert choose_network(twins, None, ONE.network_id) == ONE


def test_a_key_cannot_be_taken_to_another_network() -> None:
    for body, header, param in (("two", None, "mycellm.network"), (None, "two", "x-mycellm-network")):
        with pytest.raises(PermissionDeniedError) as refused:
            choose_network(SNAPSHOT, keyed("one"), body, header)
        assert refused.value.code == "wrong_network" and refused.value.param == param
    with pytest.raises(NetworkNotFoundError) as gone:
        choose_network(SNAPSHOT, keyed("f" * 64))  # the key's network was left
    assert gone.value.param == "api_key" and gone.value.status == 404


def test_unknown_and_malformed_names_are_refused_with_the_field() -> None:
    with pytest.raises(NetworkNotFoundError) as unknown:
        choose_network(SNAPSHOT, None, "x" * 128)
    assert unknown.value.param == "mycellm.network" and len(unknown.value.message) < 300
    for header in ("", "x" * 129):
        with pytest.raises(InvalidRequestError):
            choose_network(SNAPSHOT, None, header_network=header)


def test_a_request_sees_the_local_routes_and_its_own_networks_peers_only() -> None:
    model = ModelInfo(name="m", backend="llama_cpp")
    local = Route(kind="local", target="worker", model=model)
    in_one = Route(kind="peer", target="p1", model=model, network_id=ONE.network_id)
    in_two = Route(kind="peer", target="p2", model=model, network_id=TWO.network_id)
    snapshot = RouteSnapshot((local, in_one, in_two), (ONE, TWO), ONE.network_id)
    assert snapshot.routes_of(ONE) == [local, in_one]
    assert snapshot.routes_of(TWO) == [local, in_two]
    assert snapshot.routes_of(None) == [local]
