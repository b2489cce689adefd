"""Every signed value of networks: strict encodings, distinct field sets, and fuzzed parsers."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from mycellm.errors import FederationError
from mycellm.federation.descriptions import (
    DescriptionBook,
    NetworkDescription,
)
from mycellm.federation.invites import (
    INVITE_URL_PREFIX,
    InviteToken,
    issue_invite,
)
from mycellm.federation.member_revocations import (
    MemberRevocationBook,
    MemberRevocationList,
    issue_member_revocations,
)
from mycellm.federation.memberships import (
    MembershipCertificate,
    issue_membership,
)
from mycellm.identity.certificates import DeviceCertificate, raw_public_key
from mycellm.identity.revocations import RevocationList
from tests.federation.kit import NOW, new_key, noncanonical, refused

# All signed values ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind_index", range(4))
def test_every_kind_refuses_truncated_extended_and_noncanonical_bytes(
    samples: dict[type, bytes], kind_index: int
) -> None:
    kind = KINDS[kind_index]
    data = samples[kind]
    assert kind.from_bytes(data).to_bytes() == data
    for bad in (data[:-1], data + b"\x00", data + data, noncanonical(data)):
        with refused("malformed"):
            kind.from_bytes(bad)


def test_signed_field_sets_differ_so_no_signature_serves_two_kinds() -> None:
    kinds = [NetworkDescription, MembershipCertificate, InviteToken, MemberRevocationList, DeviceCertificate]
    kinds += [RevocationList]
    field_sets = [frozenset(kind.model_fields) - {"signature"} for kind in kinds]
    assert len(set(field_sets)) == len(kinds)


@pytest.fixture(scope="module")
def samples(authority: Ed25519PrivateKey, description: NetworkDescription) -> dict[type, bytes]:
    member = raw_public_key(new_key())
    return {
        NetworkDescription: description.to_bytes(),
        MembershipCertificate: issue_membership(authority, description, member, now=NOW).to_bytes(),
        InviteToken: issue_invite(authority, description, bind_key=member, now=NOW).to_bytes(),
        MemberRevocationList: issue_member_revocations(authority, description, [member], serial=1).to_bytes(),
    }


def verify_any(value: Any, description: NetworkDescription) -> None:
    if isinstance(value, NetworkDescription):
        value.verify()
    elif isinstance(value, InviteToken):
        value.verify(NOW)
    elif isinstance(value, MembershipCertificate):
        value.verify(description, NOW)
    else:
        value.verify(description)


KINDS = [NetworkDescription, MembershipCertificate, InviteToken, MemberRevocationList]


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(KINDS), data=st.binary(max_size=512))
def test_fuzzed_bytes_only_raise_the_typed_error(kind: Any, data: bytes) -> None:
    with pytest.raises(FederationError):
        kind.from_bytes(data)


@settings(max_examples=400, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    position=st.integers(min_value=0),
    byte=st.integers(min_value=0, max_value=255),
    mode=st.sampled_from(["flip", "insert", "delete", "truncate"]),
)
def test_mutated_values_are_refused_with_the_typed_error(
    samples: dict[type, bytes],
    description: NetworkDescription,
    kind: Any,
    position: int,
    byte: int,
    mode: str,
) -> None:
    data = samples[kind]
    index = position % len(data)
    mutated = {
        "flip": data[:index] + bytes([data[index] ^ (byte or 1)]) + data[index + 1 :],
        "insert": data[:index] + bytes([byte]) + data[index:],
        "delete": data[:index] + data[index + 1 :],
        "truncate": data[:index],
    }[mode]
    with pytest.raises(FederationError):
        verify_any(kind.from_bytes(mutated), description)


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(max_size=300), st.text(alphabet="ABCDEFabcdef0189-_", max_size=600)))
def test_fuzzed_invite_text_only_raises_the_typed_error(text: str) -> None:
    for candidate in (text, INVITE_URL_PREFIX + text):
        with pytest.raises(FederationError):
            InviteToken.from_text(candidate)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=256))
def test_fuzzed_books_only_raise_the_typed_error(data: bytes, description: NetworkDescription) -> None:
    try:
        book = DescriptionBook.from_bytes(data)
    except FederationError:
        pass
    else:
        assert book.descriptions() == []
    try:
        revocations = MemberRevocationBook.from_bytes(data, [description])
    except FederationError:
        pass
    else:
        assert revocations.lists() == []
