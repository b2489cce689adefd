"""Memberships, invites and member revocations: validity, binding, tampering, text forms, books."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mycellm.errors import FederationError
from mycellm.federation.descriptions import (
    NetworkDescription,
    issue_network_description,
)
from mycellm.federation.invites import (
    INVITE_URL_PREFIX,
    InviteRedemptions,
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
    check_member,
    issue_membership,
    renew_membership,
)
from mycellm.identity.certificates import DeviceCertificate, issue_device_certificate, raw_public_key
from tests.federation.kit import DAY, NOW, new_key, refused, resign

# Memberships ------------------------------------------------------------------------------------


def test_membership_round_trips_and_verifies(
    authority: Ed25519PrivateKey, description: NetworkDescription
) -> None:
    member = raw_public_key(new_key())
    certificate = issue_membership(authority, description, member, role="seeder", validity_s=DAY, now=NOW)
    assert MembershipCertificate.from_bytes(certificate.to_bytes()) == certificate
    certificate.verify(description, NOW)
    certificate.verify((description.authority_public_key, description.network_id), NOW)
    assert certificate.member_account_id == hashlib.sha256(member).hexdigest()


def test_membership_validity_boundaries(
    authority: Ed25519PrivateKey, description: NetworkDescription
) -> None:
    certificate = issue_membership(authority, description, raw_public_key(new_key()), validity_s=DAY, now=NOW)
    certificate.verify(description, NOW + DAY - 1)
    with refused("expired"):
        certificate.verify(description, NOW + DAY)
    certificate.verify(description, NOW - 300)
    with refused("not_yet_valid"):
        certificate.verify(description, NOW - 301)
    with refused("malformed"):
        issue_membership(authority, description, raw_public_key(new_key()), validity_s=0, now=NOW)


@pytest.mark.parametrize(
    "field, value",
    [
        ("network_id", "0" * 64),
        ("member_account_public_key", bytes(32)),
        ("role", "admin"),
        ("issued_at", NOW - 1),
        ("expires_at", NOW + 10 * DAY),
        ("serial", 7),
        ("signature", bytes(64)),
    ],
)
def test_every_tampered_membership_field_is_refused(
    authority: Ed25519PrivateKey, description: NetworkDescription, field: str, value: Any
) -> None:
    certificate = issue_membership(authority, description, raw_public_key(new_key()), now=NOW)
    tampered = MembershipCertificate.from_bytes(certificate.model_copy(update={field: value}).to_bytes())
    with refused():
        tampered.verify(description, NOW)


def test_membership_of_another_network_or_signer_is_refused(
    authority: Ed25519PrivateKey, description: NetworkDescription, named: NetworkDescription
) -> None:
    member = raw_public_key(new_key())
    certificate = issue_membership(authority, named, member, now=NOW)
    with refused("wrong_network"):
        certificate.verify(description, NOW)
    with refused("bad_signature"):
        resign(certificate, new_key()).verify(named, NOW)
    with refused("bad_signature"):
        issue_membership(new_key(), description, member, now=NOW)


def test_renewal_extends_and_counts_up(authority: Ed25519PrivateKey, description: NetworkDescription) -> None:
    certificate = issue_membership(authority, description, raw_public_key(new_key()), validity_s=DAY, now=NOW)
    renewed = certificate.renew(authority, description, validity_s=DAY, now=NOW + 2 * DAY)
    assert (renewed.serial, renewed.role) == (1, certificate.role)
    assert renewed.member_account_public_key == certificate.member_account_public_key
    assert renewed.expires_at == NOW + 3 * DAY
    renewed.verify(description, NOW + 2 * DAY)
    with refused("malformed"):
        renew_membership(authority, description, renewed, validity_s=1, now=NOW)
    with refused("bad_signature"):
        renew_membership(authority, description, resign(renewed, new_key()), now=NOW + 3 * DAY)


def test_check_member_binds_the_device_to_the_member(
    authority: Ed25519PrivateKey, description: NetworkDescription
) -> None:
    member, stranger = new_key(), new_key()
    device = issue_device_certificate(
        member, raw_public_key(new_key()), name="laptop", validity_s=DAY, now=NOW
    )
    certificate = issue_membership(
        authority, description, raw_public_key(member), validity_s=2 * DAY, now=NOW
    )
    check_member(certificate, device, description, NOW)
    foreign = issue_device_certificate(stranger, raw_public_key(new_key()), name="x", validity_s=DAY, now=NOW)
    with refused("wrong_member"):
        check_member(certificate, foreign, description, NOW)
    with refused("wrong_member"):
        check_member(certificate, device, description, NOW + DAY)  # the device certificate expired
    tampered_device = device.model_copy(update={"name": "other"})
    with refused("wrong_member"):
        check_member(certificate, DeviceCertificate.from_bytes(tampered_device.to_bytes()), description, NOW)
    book = MemberRevocationBook()
    book.accept(
        issue_member_revocations(authority, description, [raw_public_key(member)], serial=1), description
    )
    with refused("revoked"):
        check_member(certificate, device, description, NOW, revocations=book)


# Invites ----------------------------------------------------------------------------------------


def test_invite_text_forms_round_trip(authority: Ed25519PrivateKey, description: NetworkDescription) -> None:
    invite = issue_invite(authority, description, role="seeder", max_uses=3, now=NOW)
    text = invite.to_text()
    assert "=" not in text and "+" not in text and "/" not in text
    assert InviteToken.from_text(text) == invite
    assert invite.to_url() == INVITE_URL_PREFIX + text
    assert InviteToken.from_text(invite.to_url()) == invite
    assert invite.bootstrap == description.bootstrap
    invite.verify(NOW)
    invite.check_for(description)
    invite.check_redeemer(raw_public_key(new_key()))
    assert issue_invite(authority, description, now=NOW).nonce != invite.nonce


def test_named_network_invites_carry_the_name(
    authority: Ed25519PrivateKey, named: NetworkDescription
) -> None:
    invite = issue_invite(authority, named, bootstrap=["lab.example:1"], now=NOW)
    assert (invite.network_name, invite.default, invite.bootstrap) == ("lab", False, ("lab.example:1",))
    invite.verify(NOW)
    with refused("wrong_network"):
        resign(invite, authority, network_name="other").verify(NOW)
    with refused("wrong_network"):
        resign(invite, authority, default=True).verify(NOW)


def test_bad_invite_text_is_refused(authority: Ed25519PrivateKey, description: NetworkDescription) -> None:
    text = issue_invite(authority, description, now=NOW).to_text()
    bad = [
        "",
        "!!!",
        text + "=",
        text + "A",
        text[:-2],
        " " + text,
        text + "\n",
        "+" + text[1:],
        text[:-1] + "/",
        "mycellm://join?token=",
        "mycellm://join?token=" + text + "&x=1",
        "https://join?token=" + text,
        base64.urlsafe_b64encode(b"\xa0").decode().rstrip("="),
    ]
    swapped = text.replace("-", "+").replace("_", "/")
    if swapped != text:  # the token may, by chance, hold neither character
        bad.append(swapped)
    for item in bad:
        with refused():
            InviteToken.from_text(item).verify(NOW)
    # "QR" spells the byte of "QQ" with unused low bits set: a second spelling, refused.
    assert base64.urlsafe_b64decode("QR==") == base64.urlsafe_b64decode("QQ==")
    with pytest.raises(FederationError, match="canonical base64"):
        InviteToken.from_text("QR")
    with refused("malformed"):
        InviteToken.from_text(b"bytes")  # type: ignore[arg-type]


def test_tampered_invite_text_is_refused(
    authority: Ed25519PrivateKey, description: NetworkDescription
) -> None:
    invite = issue_invite(authority, description, now=NOW)
    for field, value in [
        ("role", "admin"),
        ("max_uses", 1000),
        ("expires_at", NOW + 365 * DAY),
        ("bootstrap", ("evil.example:1",)),
        ("bind_key", bytes(32)),
        ("nonce", bytes(16)),
        ("network_name", "x"),
        ("default", False),
        ("authority_public_key", raw_public_key(new_key())),
        ("issued_at", NOW - 1),
        ("network_id", "a" * 64),
    ]:
        text = invite.model_copy(update={field: value}).to_text()
        with refused():
            InviteToken.from_text(text).verify(NOW)


def test_invite_expiry_binding_and_network(
    authority: Ed25519PrivateKey, description: NetworkDescription, named: NetworkDescription
) -> None:
    redeemer, other = raw_public_key(new_key()), raw_public_key(new_key())
    invite = issue_invite(authority, description, validity_s=DAY, bind_key=redeemer, now=NOW)
    invite.verify(NOW + DAY - 1)
    with refused("expired"):
        invite.verify(NOW + DAY)
    with refused("not_yet_valid"):
        invite.verify(NOW - 301)
    invite.check_redeemer(redeemer)
    with refused("wrong_member"):
        invite.check_redeemer(other)
    with refused("wrong_network"):
        invite.check_for(named)
    with refused("wrong_network"):
        invite.check_for(issue_network_description(new_key(), name="home", now=NOW))
    with refused("bad_signature"):
        issue_invite(new_key(), description, now=NOW)
    for bad in [{"max_uses": 0}, {"max_uses": 1001}, {"validity_s": 0}, {"bind_key": b"short"}]:
        with refused("malformed"):
            issue_invite(authority, description, now=NOW, **bad)


def test_redemptions_count_distinct_accounts(
    authority: Ed25519PrivateKey, description: NetworkDescription
) -> None:
    invite = issue_invite(authority, description, max_uses=2, validity_s=DAY, now=NOW)
    redemptions = InviteRedemptions(max_invites=1)
    first, second, third = (raw_public_key(new_key()) for _ in range(3))
    assert redemptions.redeem(invite, first, description, NOW) == 1
    assert redemptions.redeem(invite, first, description, NOW) == 1  # a retry is not a new use
    assert redemptions.redeem(invite, second, description, NOW) == 0
    with refused("used_up"):
        redemptions.redeem(invite, third, description, NOW)
    another = issue_invite(authority, description, validity_s=DAY, now=NOW)
    with refused("full"):
        redemptions.redeem(another, third, description, NOW)
    with refused("expired"):
        redemptions.redeem(another, third, description, NOW + DAY)
    redemptions.forget_expired(NOW + DAY)
    assert redemptions.uses(invite) == 0
    bound = issue_invite(authority, description, bind_key=first, validity_s=DAY, now=NOW + DAY)
    with refused("wrong_member"):
        redemptions.redeem(bound, second, description, NOW + DAY)
    assert redemptions.uses(bound) == 0


# Member revocations -----------------------------------------------------------------------------


def test_member_revocations_round_trip_and_book(
    authority: Ed25519PrivateKey, description: NetworkDescription
) -> None:
    members = [raw_public_key(new_key()) for _ in range(3)]
    first = issue_member_revocations(
        authority, description, [members[1], members[0], members[0]], serial=1, now=NOW
    )
    assert list(first.revoked) == sorted(members[:2])
    assert MemberRevocationList.from_bytes(first.to_bytes()) == first
    book = MemberRevocationBook()
    assert book.accept(first, description)
    assert book.is_revoked(description.network_id, members[0])
    assert not book.is_revoked(description.network_id, members[2])
    assert not book.is_revoked("f" * 64, members[0])
    second = issue_member_revocations(authority, description, [members[2]], serial=2, now=NOW)
    assert book.accept(second, description)
    assert not book.accept(first, description)
    assert not book.is_revoked(description.network_id, members[0])
    assert book.is_revoked(description.network_id, members[2])
    again = MemberRevocationBook.from_bytes(book.to_bytes(), [description])
    assert again.lists() == book.lists()
    with refused("wrong_network"):
        MemberRevocationBook.from_bytes(book.to_bytes(), [])


def test_member_revocations_are_refused_when_forged_or_foreign(
    authority: Ed25519PrivateKey, description: NetworkDescription, named: NetworkDescription
) -> None:
    revocations = issue_member_revocations(authority, named, [raw_public_key(new_key())], serial=1, now=NOW)
    book = MemberRevocationBook(max_networks=1)
    with refused("wrong_network"):
        book.accept(revocations, description)
    with refused("bad_signature"):
        book.accept(revocations.model_copy(update={"serial": 5}), named)
    with refused("bad_signature"):
        issue_member_revocations(new_key(), named, [], serial=1)
    intruder = new_key()
    with refused("bad_signature"):
        book.accept(resign(revocations, intruder, authority_public_key=raw_public_key(intruder)), named)
    assert book.accept(revocations, named)
    with refused("full"):
        book.accept(issue_member_revocations(authority, description, [], serial=1), description)
    unsorted = cbor2.loads(revocations.to_bytes())
    unsorted["revoked"] = [bytes(32), bytes(32)]
    with refused("malformed"):
        MemberRevocationList.from_bytes(cbor2.dumps(unsorted, canonical=True))
    with refused("malformed"):
        issue_member_revocations(
            authority, named, [bytes([i, j]) + bytes(30) for i in range(5) for j in range(205)], serial=2
        )
