"""Tests for account devices: revocation lists, the revocation book, device files and the device CLI."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from mycellm.cli.app import app
from mycellm.errors import IdentityError
from mycellm.identity.certificates import issue_device_certificate
from mycellm.identity.devices import add_device, list_devices, load_revocation_list, revoke_device
from mycellm.identity.keys import load_or_create_identity
from mycellm.identity.revocations import (
    REVOCATION_LIST_MAX_BYTES,
    RevocationBook,
    RevocationList,
    issue_revocation_list,
)

NOW = 1_700_000_000


def raw_public_key(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def device_keys(count: int) -> list[bytes]:
    return [raw_public_key(Ed25519PrivateKey.generate()) for _ in range(count)]


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def list_fields(**changes: Any) -> dict[str, Any]:
    revocations = issue_revocation_list(Ed25519PrivateKey.generate(), device_keys(3), serial=4, now=NOW)
    return {**cbor2.loads(revocations.to_bytes()), **changes}


def encoded(fields: dict[str, Any]) -> bytes:
    return cbor2.dumps(fields, canonical=True)


def resigned(revocations: RevocationList, account_key: Ed25519PrivateKey, **changes: Any) -> RevocationList:
    unsigned = revocations.model_copy(update=changes)
    return unsigned.model_copy(update={"signature": account_key.sign(unsigned.signed_payload())})


@pytest.fixture
def account_dir(tmp_path: Path) -> Path:
    data_dir = tmp_path / "account"
    load_or_create_identity(data_dir, node_name="main")
    return data_dir


# --- revocation list values ---


def test_issued_list_is_sorted_unique_signed_and_answers_lookups() -> None:
    account_key = Ed25519PrivateKey.generate()
    keys = device_keys(4)
    revocations = issue_revocation_list(account_key, [*keys, keys[0]], serial=7, now=NOW + 0.9)
    revocations.verify()
    assert revocations.revoked == tuple(sorted(keys))
    assert (revocations.version, revocations.serial, revocations.issued_at) == (1, 7, NOW)
    assert revocations.account_public_key == raw_public_key(account_key)
    assert all(revocations.is_revoked(key) for key in keys)
    assert not revocations.is_revoked(device_keys(1)[0])
    assert not revocations.is_revoked(b"\xff" * 32)
    certificate = issue_device_certificate(account_key, keys[0], name="n", now=NOW)
    assert revocations.account_id == certificate.account_id


def test_list_round_trips_and_signs_everything_but_the_signature() -> None:
    revocations = issue_revocation_list(Ed25519PrivateKey.generate(), device_keys(2), serial=0, now=NOW)
    data = revocations.to_bytes()
    parsed = RevocationList.from_bytes(data)
    assert parsed == revocations and parsed.to_bytes() == data
    parsed.verify()
    payload = cbor2.loads(revocations.signed_payload())
    assert set(payload) == set(RevocationList.model_fields) - {"signature"}
    empty = issue_revocation_list(Ed25519PrivateKey.generate(), [], serial=1, now=NOW)
    assert RevocationList.from_bytes(empty.to_bytes()).revoked == ()


def test_oversized_list_is_refused_before_decoding() -> None:
    with pytest.raises(IdentityError, match="over the 65536-byte cap"):
        RevocationList.from_bytes(b"\xff" * (REVOCATION_LIST_MAX_BYTES + 1))


def unsorted(fields: dict[str, Any]) -> bytes:
    return encoded({**fields, "revoked": sorted(fields["revoked"], reverse=True)})


def non_canonical(fields: dict[str, Any]) -> bytes:
    # The same map with its keys in reverse order: valid CBOR, but not the signed encoding.
    head = bytes([0xA0 + len(fields)])
    return head + b"".join(
        cbor2.dumps(key) + cbor2.dumps(fields[key]) for key in sorted(fields, reverse=True)
    )


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda fields: b"\x5f", "not valid CBOR"),
        (lambda fields: encoded([fields]), "not a CBOR map"),
        (lambda fields: encoded({k: v for k, v in fields.items() if k != "serial"}), "lacks field.*serial"),
        (lambda fields: encoded({**fields, "extra": 1}), "unexpected field.*extra"),
        (lambda fields: encoded({**fields, "version": 2}), "version 2 is not supported"),
        (lambda fields: encoded({**fields, "version": True}), "version True is not supported"),
        (non_canonical, "canonical"),
        (lambda fields: encoded(fields) + b"\x00", "CBOR|canonical"),
        (unsorted, "sorted and without duplicates"),
        (lambda fields: encoded({**fields, "revoked": fields["revoked"][:1] * 2}), "without duplicates"),
        (lambda fields: encoded({**fields, "revoked": [b"\x01" * 31]}), "revoked"),
        (lambda fields: encoded({**fields, "revoked": b"\x01" * 32}), "revoked"),
        (lambda fields: encoded({**fields, "serial": -1}), "serial"),
        (lambda fields: encoded({**fields, "serial": "1"}), "serial"),
        (lambda fields: encoded({**fields, "signature": b"\x00" * 63}), "signature"),
        (lambda fields: encoded({**fields, "account_public_key": b"\x00" * 33}), "account_public_key"),
    ],
)
def test_malformed_lists_are_refused(build: Callable[[dict[str, Any]], bytes], message: str) -> None:
    with pytest.raises(IdentityError, match=message):
        RevocationList.from_bytes(build(list_fields()))


def test_tampered_or_foreign_signed_list_fails_verification() -> None:
    account_key = Ed25519PrivateKey.generate()
    revocations = issue_revocation_list(account_key, device_keys(2), serial=3, now=NOW)
    fields = cbor2.loads(revocations.to_bytes())
    for tampered in ({**fields, "serial": 4}, {**fields, "revoked": fields["revoked"][1:]}):
        with pytest.raises(IdentityError, match=f"does not verify against account {revocations.account_id}"):
            RevocationList.from_bytes(encoded(tampered)).verify()
    forged = resigned(revocations, Ed25519PrivateKey.generate())
    with pytest.raises(IdentityError, match="does not verify"):
        forged.verify()
    resigned(revocations, account_key, serial=9).verify()


def test_issuing_refuses_bad_input() -> None:
    account_key = Ed25519PrivateKey.generate()
    with pytest.raises(IdentityError, match="serial"):
        issue_revocation_list(account_key, [], serial=-1)
    with pytest.raises(IdentityError, match="revoked"):
        issue_revocation_list(account_key, [b"\x01" * 16], serial=1)
    with pytest.raises(IdentityError, match="over the 65536-byte cap"):
        issue_revocation_list(account_key, device_keys(2000), serial=1)


# --- revocation book ---


def test_book_keeps_the_newest_serial_per_account() -> None:
    account_key, other_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    first, second = device_keys(2)
    older = issue_revocation_list(account_key, [first], serial=1)
    newer = issue_revocation_list(account_key, [first, second], serial=2)
    other = issue_revocation_list(other_key, [second], serial=5)
    book = RevocationBook([older])
    assert book.accept(newer) is True
    assert book.accept(older) is False
    assert book.accept(issue_revocation_list(account_key, [], serial=2)) is False
    assert book.accept(other) is True
    assert sorted(book.lists(), key=lambda item: item.serial) == [newer, other]
    restored = RevocationBook.from_bytes(book.to_bytes())
    assert restored.lists() == book.lists() and restored.to_bytes() == book.to_bytes()


def test_book_refuses_a_bad_signature_without_changing() -> None:
    account_key = Ed25519PrivateKey.generate()
    held = issue_revocation_list(account_key, device_keys(1), serial=1)
    book = RevocationBook([held])
    forged = resigned(issue_revocation_list(account_key, [], serial=2), Ed25519PrivateKey.generate())
    with pytest.raises(IdentityError, match="does not verify"):
        book.accept(forged)
    assert book.lists() == [held]
    with pytest.raises(IdentityError, match="does not verify"):
        RevocationBook([forged])


def test_book_revokes_only_for_the_certificates_account() -> None:
    account_key, other_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    revoked_key, kept_key = device_keys(2)
    book = RevocationBook([issue_revocation_list(account_key, [revoked_key], serial=1)])
    assert book.is_revoked(issue_device_certificate(account_key, revoked_key, name="a"))
    assert not book.is_revoked(issue_device_certificate(account_key, kept_key, name="b"))
    # The same device key certified by another account is that account's business.
    assert not book.is_revoked(issue_device_certificate(other_key, revoked_key, name="c"))
    assert not RevocationBook().is_revoked(issue_device_certificate(account_key, revoked_key, name="a"))


def test_malformed_books_are_refused() -> None:
    account_key = Ed25519PrivateKey.generate()
    good = issue_revocation_list(account_key, [], serial=1).to_bytes()
    tampered = encoded({**cbor2.loads(good), "serial": 2})
    cases = [
        (b"\x00" * (16 * 1024 * 1024 + 1), "over the"),
        (b"\x5f", "not valid CBOR"),
        (encoded({"a": good}), "not a CBOR array"),
        (encoded([good, 1]), "not a CBOR array"),
        (encoded([tampered]), "entry 0: .*does not verify"),
        (encoded([good, good]), "entry 1: a second list"),
        (encoded([good[:-1]]), "entry 0"),
    ]
    for data, message in cases:
        with pytest.raises(IdentityError, match=message):
            RevocationBook.from_bytes(data)
    assert RevocationBook.from_bytes(encoded([])).lists() == []


# --- device files ---


def test_added_device_gets_its_own_identity_without_the_account_key(
    account_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "laptop"
    certificate = add_device(account_dir, "laptop", out, role="client", validity_s=86400 * 30)
    certificate.verify()
    assert sorted(os.listdir(out / "identity")) == ["device.cert", "device.key"]
    assert mode_of(out / "identity") == 0o700
    assert all(mode_of(path) == 0o600 for path in (out / "identity").iterdir())
    recorded = account_dir / "identity" / "devices" / f"{certificate.peer_id}.cert"
    assert mode_of(recorded) == 0o600 and mode_of(recorded.parent) == 0o700
    device = load_or_create_identity(out, node_name="ignored")
    assert device.account_key is None
    assert device.peer_id == certificate.peer_id and device.certificate == certificate
    own = load_or_create_identity(account_dir, node_name="main")
    assert certificate.account_id == own.account_id and certificate.role == "client"


def test_add_refuses_overwrite_missing_account_and_taken_names(account_dir: Path, tmp_path: Path) -> None:
    add_device(account_dir, "laptop", tmp_path / "laptop")
    before = (tmp_path / "laptop" / "identity" / "device.key").read_bytes()
    with pytest.raises(IdentityError, match="refusing to overwrite"):
        add_device(account_dir, "desk", tmp_path / "laptop")
    with pytest.raises(IdentityError, match="refusing to overwrite"):
        add_device(account_dir, "desk", account_dir)
    assert (tmp_path / "laptop" / "identity" / "device.key").read_bytes() == before
    with pytest.raises(IdentityError, match=r"holds no account\.key"):
        add_device(tmp_path / "laptop", "phone", tmp_path / "phone")
    with pytest.raises(IdentityError, match="no identity in"):
        add_device(tmp_path / "empty", "phone", tmp_path / "phone")
    for taken in ("laptop", "main"):
        with pytest.raises(IdentityError, match="is taken"):
            add_device(account_dir, taken, tmp_path / "phone")
    assert not (tmp_path / "phone").exists()
    assert len(list_devices(account_dir)) == 2


def test_revoke_by_name_and_prefix_and_again(account_dir: Path, tmp_path: Path) -> None:
    assert load_revocation_list(account_dir) is None
    laptop = add_device(account_dir, "laptop", tmp_path / "laptop")
    phone = add_device(account_dir, "phone", tmp_path / "phone")
    first = revoke_device(account_dir, "laptop")
    assert (first.serial, first.revoked) == (1, (laptop.device_public_key,))
    second = revoke_device(account_dir, phone.peer_id[:8].upper())
    assert second.serial == 2 and second.is_revoked(phone.device_public_key) and len(second.revoked) == 2
    assert revoke_device(account_dir, phone.peer_id) == second
    assert revoke_device(account_dir, "laptop") == second
    path = account_dir / "identity" / "revocations.cbor"
    assert mode_of(path) == 0o600 and load_revocation_list(account_dir) == second
    records = list_devices(account_dir)
    assert records[0].own and [(r.certificate.name, r.own, r.revoked) for r in records[1:]] in (
        [("laptop", False, True), ("phone", False, True)],
        [("phone", False, True), ("laptop", False, True)],  # issued in the same second: by peer id
    )
    assert (records[0].certificate.name, records[0].revoked) == ("main", False)
    # A revoked device's name may be given to a new one.
    add_device(account_dir, "laptop", tmp_path / "laptop2")


def test_revoke_refuses_unknown_ambiguous_and_own(account_dir: Path, tmp_path: Path) -> None:
    laptop = add_device(account_dir, "laptop", tmp_path / "laptop")
    own = load_or_create_identity(account_dir, node_name="main")
    add_device(account_dir, laptop.peer_id[:8], tmp_path / "trap")
    with pytest.raises(IdentityError, match="ambiguous"):
        revoke_device(account_dir, laptop.peer_id[:8])
    for unknown in ("desk", laptop.peer_id[:7], "0" * 64):
        with pytest.raises(IdentityError, match="no device of this account"):
            revoke_device(account_dir, unknown)
    for name in ("main", own.peer_id[:12]):
        with pytest.raises(IdentityError, match="own device"):
            revoke_device(account_dir, name)
    with pytest.raises(IdentityError, match=r"holds no account\.key"):
        revoke_device(tmp_path / "laptop", "trap")
    assert load_revocation_list(account_dir) is None
    revoke_device(account_dir, laptop.peer_id[:9])


def test_bad_revocation_and_device_files_are_clear_errors(account_dir: Path, tmp_path: Path) -> None:
    laptop = add_device(account_dir, "laptop", tmp_path / "laptop")
    revoke_device(account_dir, "laptop")
    path = account_dir / "identity" / "revocations.cbor"
    fields = cbor2.loads(path.read_bytes())
    path.write_bytes(encoded({**fields, "serial": 9}))
    with pytest.raises(IdentityError, match=r"revocations\.cbor: .*does not verify"):
        load_revocation_list(account_dir)
    foreign = issue_revocation_list(Ed25519PrivateKey.generate(), [], serial=1)
    path.write_bytes(foreign.to_bytes())
    assert load_revocation_list(account_dir) == foreign
    with pytest.raises(IdentityError, match="not this node's account"):
        revoke_device(account_dir, "laptop")
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="too open"):
        load_revocation_list(account_dir)
    path.unlink()
    recorded = account_dir / "identity" / "devices" / f"{laptop.peer_id}.cert"
    recorded.write_bytes(encoded({**cbor2.loads(recorded.read_bytes()), "name": "laptob"}))
    with pytest.raises(IdentityError, match=f"{laptop.peer_id}.cert: .*does not verify"):
        list_devices(account_dir)


# --- command line ---


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def assert_one_line_failure(result: Any, message: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mycellm: identity error:") and message in lines[0]


def test_cli_adds_lists_and_revokes_devices(account_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "laptop"
    added = invoke("device", "add", "laptop", "--out", str(out), "--data-dir", str(account_dir))
    assert added.exit_code == 0, added.output
    peer_id = load_or_create_identity(out, node_name="ignored").peer_id
    assert f"peer id: {peer_id}" in added.stdout
    assert f"mycellm serve --data-dir {out}" in added.stdout
    listed = invoke("device", "list", "--json", "--data-dir", str(account_dir))
    assert listed.exit_code == 0, listed.output
    data = json.loads(listed.stdout)
    assert [(item["name"], item["own"], item["revoked"]) for item in data] == [
        ("main", True, False),
        ("laptop", False, False),
    ]
    assert data[1]["peer_id"] == peer_id and data[1]["role"] == "node"
    assert set(data[1]) == {"peer_id", "name", "role", "issued_at", "expires_at", "revoked", "own"}
    revoked = invoke("device", "revoke", peer_id[:10], "--data-dir", str(account_dir))
    assert revoked.exit_code == 0, revoked.output
    assert "serial 1: 1 device(s) revoked" in revoked.stdout
    again = invoke("device", "revoke", "laptop", "--data-dir", str(account_dir))
    assert again.exit_code == 0 and "already revoked" in again.stdout and "serial 1:" in again.stdout
    table = invoke("device", "list", "--data-dir", str(account_dir))
    assert table.exit_code == 0, table.output
    assert peer_id[:16] in table.stdout and "revoked" in table.stdout and "own" in table.stdout


def test_cli_errors_are_one_line_with_exit_code_1(account_dir: Path, tmp_path: Path) -> None:
    device_dir = tmp_path / "laptop"
    assert (
        invoke("device", "add", "laptop", "--out", str(device_dir), "--data-dir", str(account_dir)).exit_code
        == 0
    )
    result = invoke("device", "add", "phone", "--out", str(tmp_path / "phone"), "--data-dir", str(device_dir))
    assert_one_line_failure(result, "holds no account.key")
    result = invoke("device", "add", "desk", "--out", str(device_dir), "--data-dir", str(account_dir))
    assert_one_line_failure(result, "refusing to overwrite")
    assert_one_line_failure(invoke("device", "revoke", "desk", "--data-dir", str(account_dir)), "no device")
    assert_one_line_failure(invoke("device", "revoke", "main", "--data-dir", str(account_dir)), "own device")
    assert_one_line_failure(invoke("device", "list", "--data-dir", str(tmp_path / "none")), "no identity in")
    result = invoke(
        "device", "add", "x", "--out", str(tmp_path / "x"), "--role", "king", "--data-dir", str(account_dir)
    )
    assert result.exit_code == 2
