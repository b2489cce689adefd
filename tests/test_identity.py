"""Tests for node identity: device certificates, peer ids and the key files on disk."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mycellm.errors import IdentityError
from mycellm.identity.certificates import DeviceCertificate, issue_device_certificate, peer_id_for
from mycellm.identity.keys import NodeIdentity, load_or_create_identity

NOW = 1_700_000_000
DAY_S = 86400


def raw_public_key(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def overwrite(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    os.chmod(path, 0o600)


def make_certificate(
    account_key: Ed25519PrivateKey | None = None, device_key: Ed25519PrivateKey | None = None, **options: Any
) -> DeviceCertificate:
    account_key = account_key or Ed25519PrivateKey.generate()
    device_key = device_key or Ed25519PrivateKey.generate()
    options = {"name": "node-a", "now": NOW, **options}
    return issue_device_certificate(account_key, raw_public_key(device_key), **options)


def resigned(
    certificate: DeviceCertificate, account_key: Ed25519PrivateKey, **changes: Any
) -> DeviceCertificate:
    unsigned = certificate.model_copy(update=changes)
    return unsigned.model_copy(update={"signature": account_key.sign(unsigned.signed_payload())})


def certificate_fields() -> dict[str, Any]:
    return cbor2.loads(make_certificate().to_bytes())


def identity_dir(tmp_path: Path) -> Path:
    return tmp_path / "identity"


# --- peer id and certificate values ---


def test_peer_id_is_sha256_of_device_public_key() -> None:
    account_key, device_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    certificate = make_certificate(account_key, device_key)
    expected_peer = hashlib.sha256(raw_public_key(device_key)).hexdigest()
    assert peer_id_for(raw_public_key(device_key)) == expected_peer
    assert certificate.peer_id == expected_peer
    assert certificate.account_id == hashlib.sha256(raw_public_key(account_key)).hexdigest()


def test_peer_id_rejects_wrong_key_length() -> None:
    with pytest.raises(IdentityError, match="32"):
        peer_id_for(b"\x01" * 31)


def test_issued_certificate_verifies_and_carries_its_fields() -> None:
    certificate = make_certificate(role="bootstrap", validity_s=DAY_S)
    certificate.verify(now=NOW + 10)
    assert (certificate.version, certificate.role, certificate.name) == (1, "bootstrap", "node-a")
    assert (certificate.issued_at, certificate.expires_at) == (NOW, NOW + DAY_S)


def test_certificate_round_trips_through_bytes() -> None:
    certificate = make_certificate()
    data = certificate.to_bytes()
    parsed = DeviceCertificate.from_bytes(data)
    assert parsed == certificate
    assert parsed.to_bytes() == data
    parsed.verify(now=NOW)


def test_signed_payload_excludes_only_the_signature() -> None:
    certificate = make_certificate()
    payload = cbor2.loads(certificate.signed_payload())
    assert set(payload) == set(DeviceCertificate.model_fields) - {"signature"}
    assert certificate.signed_payload() == cbor2.dumps(payload, canonical=True)


@pytest.mark.parametrize(
    ("field", "tamper"),
    [
        ("name", lambda value: value[:-1] + chr(ord(value[-1]) ^ 1)),
        ("expires_at", lambda value: value ^ 0x100),
        ("role", lambda value: "bootstrap"),
        ("device_public_key", lambda value: bytes([value[0] ^ 1]) + value[1:]),
    ],
)
def test_tampered_certificate_field_fails_verification(field: str, tamper: Callable[[Any], Any]) -> None:
    fields = certificate_fields()
    fields[field] = tamper(fields[field])
    tampered = DeviceCertificate.from_bytes(cbor2.dumps(fields, canonical=True))
    with pytest.raises(IdentityError, match="signature does not verify"):
        tampered.verify(now=NOW)


def test_certificate_signed_by_another_account_fails() -> None:
    account_key, other_account_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    certificate = make_certificate(account_key)
    forged = resigned(certificate, other_account_key)
    with pytest.raises(IdentityError, match="signature does not verify"):
        forged.verify(now=NOW)
    # The same statement signed by the named account does verify.
    resigned(certificate, account_key).verify(now=NOW)


def test_expired_certificate_fails_verify() -> None:
    certificate = make_certificate(validity_s=DAY_S)
    certificate.verify(now=NOW + DAY_S - 1)
    with pytest.raises(IdentityError, match="expired"):
        certificate.verify(now=NOW + DAY_S)


def test_certificate_issued_in_the_future_fails_verify() -> None:
    certificate = make_certificate(now=NOW + 1000)
    certificate.verify(now=NOW + 800, clock_skew_s=300)
    with pytest.raises(IdentityError, match="future"):
        certificate.verify(now=NOW, clock_skew_s=300)


def test_certificate_expiring_before_issue_fails_verify() -> None:
    account_key = Ed25519PrivateKey.generate()
    certificate = resigned(make_certificate(account_key), account_key, expires_at=NOW)
    with pytest.raises(IdentityError, match="before it is issued"):
        certificate.verify(now=NOW)


def test_issue_rejects_bad_name_and_validity() -> None:
    with pytest.raises(IdentityError, match="name"):
        make_certificate(name="")
    with pytest.raises(IdentityError, match="name"):
        make_certificate(name="x" * 65)
    with pytest.raises(IdentityError, match="validity"):
        make_certificate(validity_s=0)


# --- parsing untrusted certificate bytes ---


def with_fields(**changes: Any) -> bytes:
    return cbor2.dumps({**certificate_fields(), **changes}, canonical=True)


def without_field(name: str) -> bytes:
    fields = certificate_fields()
    del fields[name]
    return cbor2.dumps(fields, canonical=True)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        # A valid-looking map that is only wrong in being too large: the cap must fire first.
        pytest.param(with_fields(padding=b"\x00" * 4096), "4096-byte cap", id="oversized"),
        pytest.param(b"\xff\xfe\xfd garbage", "not valid CBOR", id="garbage"),
        pytest.param(b"", "not valid CBOR", id="empty"),
        pytest.param(cbor2.dumps([1, 2, 3]), "not a CBOR map", id="array"),
        pytest.param(cbor2.dumps("text"), "not a CBOR map", id="string"),
        pytest.param(without_field("expires_at"), "lacks field.*expires_at", id="missing-field"),
        pytest.param(with_fields(comment="hi"), "unexpected field.*comment", id="extra-field"),
        pytest.param(with_fields(version=2), "version 2", id="unknown-version"),
        pytest.param(with_fields(device_public_key=b"\x01" * 31), "device_public_key", id="short-device-key"),
        pytest.param(
            with_fields(account_public_key=b"\x01" * 33), "account_public_key", id="long-account-key"
        ),
        pytest.param(with_fields(signature=b"\x01" * 63), "signature", id="short-signature"),
        pytest.param(with_fields(name=12), "name", id="name-not-text"),
        pytest.param(with_fields(issued_at="yesterday"), "issued_at", id="time-not-integer"),
        pytest.param(with_fields(expires_at=True), "expires_at", id="time-is-boolean"),
        pytest.param(with_fields(device_public_key="a" * 32), "device_public_key", id="key-not-bytes"),
        pytest.param(with_fields(role="admin"), "role", id="unknown-role"),
        pytest.param(with_fields(name=""), "name", id="empty-name"),
        pytest.param(make_certificate().to_bytes() + b"\x00", "canonical", id="trailing-bytes"),
        pytest.param(
            cbor2.dumps(dict(sorted(certificate_fields().items()))), "canonical", id="not-canonical"
        ),
    ],
)
def test_from_bytes_rejects_malformed_certificates(data: bytes, message: str) -> None:
    with pytest.raises(IdentityError, match=message):
        DeviceCertificate.from_bytes(data)


# --- key files on disk ---


def test_first_creation_makes_private_files(tmp_path: Path) -> None:
    identity = load_or_create_identity(tmp_path, node_name="node-a", now=NOW)
    directory = identity_dir(tmp_path)
    assert mode_of(directory) == 0o700
    assert sorted(path.name for path in directory.iterdir()) == ["account.key", "device.cert", "device.key"]
    for path in directory.iterdir():
        assert mode_of(path) == 0o600, path
    assert identity.account_key is not None
    assert identity.certificate.name == "node-a"
    assert identity.certificate.role == "node"
    assert (directory / "device.cert").read_bytes() == identity.certificate.to_bytes()
    assert [path.name for path in tmp_path.iterdir()] == ["identity"]  # no staging left behind
    identity.certificate.verify(now=NOW)


def test_second_load_returns_the_same_identity(tmp_path: Path) -> None:
    first = load_or_create_identity(tmp_path, node_name="node-a", now=NOW)
    second = load_or_create_identity(tmp_path, node_name="node-a", now=NOW + 60)
    assert second.peer_id == first.peer_id
    assert second.account_id == first.account_id
    assert second.certificate == first.certificate
    assert second.device_public_key == first.device_public_key
    assert first.peer_id == hashlib.sha256(first.device_public_key).hexdigest()


def test_identity_signs_with_the_device_key(tmp_path: Path) -> None:
    identity = load_or_create_identity(tmp_path, node_name="node-a", now=NOW)
    signature = identity.sign(b"hello")
    identity.device_key.public_key().verify(signature, b"hello")
    assert identity.certificate.device_public_key == identity.device_public_key


def test_load_reissues_expired_certificate_keeping_the_peer_id(tmp_path: Path) -> None:
    first = load_or_create_identity(tmp_path, node_name="node-a", validity_s=10 * DAY_S, now=NOW)
    later = NOW + 20 * DAY_S
    with pytest.raises(IdentityError, match="expired"):
        first.certificate.verify(now=later)
    renewed = load_or_create_identity(tmp_path, node_name="node-a", validity_s=10 * DAY_S, now=later)
    assert renewed.peer_id == first.peer_id
    assert renewed.account_id == first.account_id
    assert renewed.certificate.issued_at == later
    renewed.certificate.verify(now=later)
    certificate_path = identity_dir(tmp_path) / "device.cert"
    assert certificate_path.read_bytes() == renewed.certificate.to_bytes()
    assert mode_of(certificate_path) == 0o600
    assert sorted(path.name for path in identity_dir(tmp_path).iterdir()) == [
        "account.key",
        "device.cert",
        "device.key",
    ]


def test_load_renews_certificate_expiring_within_a_day(tmp_path: Path) -> None:
    first = load_or_create_identity(tmp_path, node_name="node-a", validity_s=10 * DAY_S, now=NOW)
    almost = NOW + 10 * DAY_S - 3600
    renewed = load_or_create_identity(tmp_path, node_name="node-a", validity_s=10 * DAY_S, now=almost)
    assert renewed.certificate.expires_at == almost + 10 * DAY_S
    assert renewed.peer_id == first.peer_id
    kept = load_or_create_identity(tmp_path, node_name="node-a", validity_s=10 * DAY_S, now=almost + 60)
    assert kept.certificate == renewed.certificate


def test_load_without_account_key_uses_device_key_and_certificate(tmp_path: Path) -> None:
    first = load_or_create_identity(tmp_path, node_name="node-a", now=NOW)
    (identity_dir(tmp_path) / "account.key").unlink()
    loaded = load_or_create_identity(tmp_path, node_name="node-a", now=NOW + 60)
    assert loaded.account_key is None
    assert loaded.peer_id == first.peer_id
    assert loaded.account_id == first.account_id


def test_load_without_account_key_refuses_expired_certificate(tmp_path: Path) -> None:
    load_or_create_identity(tmp_path, node_name="node-a", validity_s=DAY_S, now=NOW)
    (identity_dir(tmp_path) / "account.key").unlink()
    certificate_bytes = (identity_dir(tmp_path) / "device.cert").read_bytes()
    with pytest.raises(IdentityError, match=r"device\.cert.*expired"):
        load_or_create_identity(tmp_path, node_name="node-a", now=NOW + 2 * DAY_S)
    assert (identity_dir(tmp_path) / "device.cert").read_bytes() == certificate_bytes


def test_load_refuses_device_key_not_matching_the_certificate(tmp_path: Path) -> None:
    load_or_create_identity(tmp_path, node_name="node-a", now=NOW)
    overwrite(identity_dir(tmp_path) / "device.key", pem(Ed25519PrivateKey.generate()))
    with pytest.raises(IdentityError, match=r"device\.key does not hold the device key"):
        load_or_create_identity(tmp_path, node_name="node-a", now=NOW)


def test_load_refuses_account_key_not_matching_the_certificate(tmp_path: Path) -> None:
    load_or_create_identity(tmp_path, node_name="node-a", now=NOW)
    overwrite(identity_dir(tmp_path) / "account.key", pem(Ed25519PrivateKey.generate()))
    with pytest.raises(IdentityError, match=r"account\.key"):
        load_or_create_identity(tmp_path, node_name="node-a", now=NOW)


def test_load_refuses_certificate_signed_by_another_account(tmp_path: Path) -> None:
    identity = load_or_create_identity(tmp_path, node_name="node-a", now=NOW)
    certificate_path = identity_dir(tmp_path) / "device.cert"
    (identity_dir(tmp_path) / "account.key").unlink()
    forged = resigned(identity.certificate, Ed25519PrivateKey.generate())
    overwrite(certificate_path, forged.to_bytes())
    with pytest.raises(IdentityError, match=r"device\.cert.*signature does not verify"):
        load_or_create_identity(tmp_path, node_name="node-a", now=NOW)


def test_load_refuses_tampered_certificate_and_keeps_the_file(tmp_path: Path) -> None:
    load_or_create_identity(tmp_path, node_name="node-a", now=NOW)
    certificate_path = identity_dir(tmp_path) / "device.cert"
    fields = cbor2.loads(certificate_path.read_bytes())
    fields["name"] = "node-b"
    tampered = cbor2.dumps(fields, canonical=True)
    overwrite(certificate_path, tampered)
    with pytest.raises(IdentityError, match=r"device\.cert.*signature does not verify"):
        load_or_create_identity(tmp_path, node_name="node-a", now=NOW)
    assert certificate_path.read_bytes() == tampered


def test_load_refuses_corrupted_certificate_file(tmp_path: Path) -> None:
    load_or_create_identity(tmp_path, node_name="node-a", now=NOW)
    overwrite(identity_dir(tmp_path) / "device.cert", b"\xff\x00 corrupted")
    with pytest.raises(IdentityError, match=r"device\.cert.*not valid CBOR"):
        load_or_create_identity(tmp_path, node_name="node-a", now=NOW)


@pytest.mark.parametrize("file_name", ["account.key", "device.key"])
def test_load_refuses_group_readable_key_file(tmp_path: Path, file_name: str) -> None:
    load_or_create_identity(tmp_path, node_name="node-a", now=NOW)
    os.chmod(identity_dir(tmp_path) / file_name, 0o644)
    with pytest.raises(IdentityError, match=f"0644.*{re.escape(file_name)}.*too open"):
        load_or_create_identity(tmp_path, node_name="node-a", now=NOW)


@pytest.mark.parametrize(
    ("removed", "message"),
    [
        (["device.cert"], "device.cert missing"),
        (["device.key"], "device.key missing"),
        (["device.key", "device.cert"], "device.key, device.cert missing"),
    ],
)
def test_load_refuses_partial_identity(tmp_path: Path, removed: list[str], message: str) -> None:
    load_or_create_identity(tmp_path, node_name="node-a", now=NOW)
    for file_name in removed:
        (identity_dir(tmp_path) / file_name).unlink()
    with pytest.raises(IdentityError, match=message):
        load_or_create_identity(tmp_path, node_name="node-a", now=NOW)
    assert not any((identity_dir(tmp_path) / file_name).exists() for file_name in removed)


@pytest.mark.parametrize("file_name", ["account.key", "device.key"])
def test_load_refuses_key_file_that_is_not_pem(tmp_path: Path, file_name: str) -> None:
    load_or_create_identity(tmp_path, node_name="node-a", now=NOW)
    overwrite(identity_dir(tmp_path) / file_name, b"this is not a PEM key\n")
    with pytest.raises(IdentityError, match=f"{re.escape(file_name)} is not an unencrypted PEM private key"):
        load_or_create_identity(tmp_path, node_name="node-a", now=NOW)


def test_load_refuses_key_that_is_not_ed25519(tmp_path: Path) -> None:
    load_or_create_identity(tmp_path, node_name="node-a", now=NOW)
    overwrite(identity_dir(tmp_path) / "device.key", pem(generate_private_key(SECP256R1())))
    with pytest.raises(IdentityError, match=r"device\.key holds a .*not an Ed25519 private key"):
        load_or_create_identity(tmp_path, node_name="node-a", now=NOW)


def test_node_identity_is_frozen(tmp_path: Path) -> None:
    identity = load_or_create_identity(tmp_path, node_name="node-a", now=NOW)
    assert isinstance(identity, NodeIdentity)
    with pytest.raises(AttributeError):
        identity.certificate = make_certificate()  # type: ignore[misc]
