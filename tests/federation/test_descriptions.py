"""Network ids and signed network descriptions: derivation, strict bytes, tampering, the book."""

from __future__ import annotations

import hashlib
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mycellm.config import PriceSettings
from mycellm.errors import FederationError
from mycellm.federation.descriptions import (
    DESCRIPTION_MAX_BYTES,
    DescriptionBook,
    JoinPolicy,
    NetworkDescription,
    NetworkPrices,
    issue_network_description,
)
from mycellm.federation.invites import (
    InviteToken,
)
from mycellm.federation.memberships import (
    MembershipCertificate,
)
from mycellm.federation.network_ids import network_id_for
from mycellm.identity.certificates import raw_public_key
from tests.federation.kit import NOW, new_key, noncanonical, refused, resign

# Network ids ------------------------------------------------------------------------------------


def test_default_network_id_is_the_sha256_of_the_authority_key(authority: Ed25519PrivateKey) -> None:
    key = raw_public_key(authority)
    assert network_id_for(key) == hashlib.sha256(key).hexdigest()


def test_named_network_ids_are_distinct_per_name_and_account(authority: Ed25519PrivateKey) -> None:
    key, other = raw_public_key(authority), raw_public_key(new_key())
    assert network_id_for(key, "lab") == hashlib.sha256(key + b"\x00lab").hexdigest()
    ids = {
        network_id_for(key),
        network_id_for(key, "lab"),
        network_id_for(key, "lab2"),
        network_id_for(other),
    }
    ids |= {network_id_for(other, "lab")}
    assert len(ids) == 5
    assert network_id_for(key, "Lab") != network_id_for(key, "lab")


@pytest.mark.parametrize("name", ["", "x" * 65, "has space", "slash/", "ünï", "a\x00b", "tab\t"])
def test_bad_network_names_are_refused(authority: Ed25519PrivateKey, name: str) -> None:
    with refused("malformed"):
        network_id_for(raw_public_key(authority), name)


def test_network_names_at_the_limits(authority: Ed25519PrivateKey) -> None:
    key = raw_public_key(authority)
    assert len(network_id_for(key, "a")) == len(network_id_for(key, "A.b_c-9" + "x" * 57)) == 64


@pytest.mark.parametrize("key", [b"", bytes(31), bytes(33)])
def test_authority_keys_are_32_bytes(key: bytes) -> None:
    with refused("malformed"):
        network_id_for(key)


# Descriptions -----------------------------------------------------------------------------------


def test_description_round_trips_and_verifies(
    description: NetworkDescription, named: NetworkDescription
) -> None:
    for value in (description, named):
        parsed = NetworkDescription.from_bytes(value.to_bytes())
        assert parsed == value
        parsed.verify()
    assert description.network_id == network_id_for(description.authority_public_key)
    assert named.network_id == network_id_for(named.authority_public_key, "lab")
    assert description.bootstrap == ("seed.example.org:8421", "10.0.0.1:8421", "[::1]:9000")


def test_prices_are_exact_and_convert_to_settings(description: NetworkDescription) -> None:
    prices = description.prices
    assert prices.tier_prices_micro == {
        "tiny": 20_000,
        "fast": 100_000,
        "capable": 500_000,
        "frontier": 2_000_000,
    }
    assert (prices.prompt_weight_ppm, prices.relay_fee_ppm, prices.initial_grant_micro) == (
        250_000,
        100_000,
        10**8,
    )
    assert prices.to_settings() == PriceSettings()
    with refused("malformed"):
        NetworkPrices.from_settings(PriceSettings(tier_prices={"custom": 1.0}))


TAMPERED_DESCRIPTION_FIELDS: dict[str, Any] = {
    "name": "other",
    "default": False,
    "visibility": "private",
    "bootstrap": ("evil.example:1",),
    "prices": NetworkPrices.from_settings(PriceSettings(initial_grant=10**6)),
    "model_tiers": {"smollm2": "frontier"},
    "join_policy": JoinPolicy(max_joins_per_address_per_hour=1000, max_joins_per_address_per_day=1000),
    "serial": 99,
    "issued_at": NOW + 1,
    "network_id": "0" * 64,
    "authority_public_key": bytes(32),
}


@pytest.mark.parametrize("field", sorted(TAMPERED_DESCRIPTION_FIELDS))
def test_every_tampered_description_field_is_refused(description: NetworkDescription, field: str) -> None:
    tampered = description.model_copy(update={field: TAMPERED_DESCRIPTION_FIELDS[field]})
    parsed = NetworkDescription.from_bytes(tampered.to_bytes())
    with refused():
        parsed.verify()


def test_tampered_signature_and_wrong_signer_are_refused(
    authority: Ed25519PrivateKey, description: NetworkDescription
) -> None:
    flipped = bytes([description.signature[0] ^ 1]) + description.signature[1:]
    with refused("bad_signature"):
        description.model_copy(update={"signature": flipped}).verify()
    with refused("bad_signature"):
        resign(description, new_key()).verify()
    # Another account signs for itself but claims this network's id: the id does not derive.
    intruder = new_key()
    with refused("wrong_network"):
        resign(description, intruder, authority_public_key=raw_public_key(intruder)).verify()
    # The right key naming a network it would not derive (the named form under the default flag).
    with refused("wrong_network"):
        resign(description, authority, default=False).verify()


def test_description_bytes_are_strict(description: NetworkDescription) -> None:
    data = description.to_bytes()
    decoded = cbor2.loads(data)
    bad = [
        data[:-1],
        data + b"\x00",
        noncanonical(data),
        cbor2.dumps({**decoded, "extra": 1}, canonical=True),
        cbor2.dumps({k: v for k, v in decoded.items() if k != "serial"}, canonical=True),
        cbor2.dumps({**decoded, "version": 2}, canonical=True),
        cbor2.dumps({**decoded, "serial": True}, canonical=True),
        cbor2.dumps({**decoded, "serial": 1.0}, canonical=True),
        cbor2.dumps({**decoded, "bootstrap": ["seed.example.org:8421"] * 2}, canonical=True),
        cbor2.dumps({**decoded, "bootstrap": ["no-port"]}, canonical=True),
        cbor2.dumps({**decoded, "model_tiers": {"m": "huge"}}, canonical=True),
        cbor2.dumps({**decoded, "join_policy": {**decoded["join_policy"], "x": 1}}, canonical=True),
        cbor2.dumps([decoded]),
        b"",
        b"\xff",
    ]
    for item in bad:
        with refused("malformed"):
            NetworkDescription.from_bytes(item)


def test_oversized_input_is_refused_before_decoding() -> None:
    # Not CBOR at all: only the size check can be what refuses it.
    with pytest.raises(FederationError, match="cap"):
        NetworkDescription.from_bytes(b"\xff" * (DESCRIPTION_MAX_BYTES + 1))
    with pytest.raises(FederationError, match="cap"):
        InviteToken.from_text("A" * 100_000)
    with pytest.raises(FederationError, match="cap"):
        MembershipCertificate.from_bytes(b"\xff" * 2000)


@pytest.mark.parametrize(
    "address",
    ["host", ":80", "host:0", "host:65536", "host:8x", "-bad.example:1", "[::1", "[zz::1]:1", "a..b:1"],
)
def test_bad_bootstrap_addresses_are_refused(authority: Ed25519PrivateKey, address: str) -> None:
    with refused("malformed"):
        issue_network_description(authority, name="home", bootstrap=[address])


def test_description_bounds(authority: Ed25519PrivateKey) -> None:
    with refused("malformed"):
        issue_network_description(authority, name="home", bootstrap=[f"h{i}.example:1" for i in range(17)])
    with refused("malformed"):
        issue_network_description(authority, name="home", model_tiers={f"m{i}": "tiny" for i in range(257)})
    with refused("malformed"):
        issue_network_description(authority, name="home", model_tiers={"m" * 129: "tiny"})
    with pytest.raises(ValueError):
        JoinPolicy(max_joins_per_address_per_hour=5, max_joins_per_address_per_day=4)


def test_book_keeps_the_newest_description(authority: Ed25519PrivateKey) -> None:
    older = issue_network_description(authority, name="home", serial=1, now=NOW)
    newer = issue_network_description(authority, name="home", serial=2, now=NOW)
    conflicting = issue_network_description(authority, name="home", visibility="public", serial=2, now=NOW)
    book = DescriptionBook([older])
    assert book.accept(newer)
    assert not book.accept(older)
    assert not book.accept(newer)
    with refused("conflict"):
        book.accept(conflicting)
    assert book.get(newer.network_id) == newer
    forged = newer.model_copy(update={"serial": 3})
    with refused("bad_signature"):
        book.accept(forged)
    assert book.get(newer.network_id) == newer


def test_book_is_bounded_and_round_trips(authority: Ed25519PrivateKey) -> None:
    book = DescriptionBook(max_networks=2)
    assert book.accept(issue_network_description(authority, name="home", now=NOW))
    assert book.accept(issue_network_description(authority, name="lab", default=False, now=NOW))
    with refused("full"):
        book.accept(issue_network_description(new_key(), name="home", now=NOW))
    again = DescriptionBook.from_bytes(book.to_bytes())
    assert again.descriptions() == book.descriptions()
    one = book.descriptions()[0].to_bytes()
    for bad in [b"", b"\xa0", cbor2.dumps([one, one]), cbor2.dumps([b"junk"]), book.to_bytes() + b"\x00"]:
        with refused():
            DescriptionBook.from_bytes(bad)
