"""The authority's network commands on a real data directory and SQLite: create, list, show, invite,
members and revoke, and the bad input and missing account key they refuse without writing anything."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mycellm.cli.app import app
from mycellm.config import PriceSettings
from mycellm.federation.authority import (
    DESCRIPTION_FILE,
    MEMBER_REVOCATIONS_FILE,
    load_network,
    next_description,
    parse_duration,
)
from mycellm.federation.descriptions import NetworkDescription, NetworkPrices
from mycellm.federation.invites import InviteToken
from mycellm.federation.member_revocations import MemberRevocationList
from mycellm.federation.memberships import issue_membership
from mycellm.federation.network_ids import network_id_for
from mycellm.identity.certificates import raw_public_key
from mycellm.identity.devices import add_device
from mycellm.identity.keys import NodeIdentity, load_or_create_identity
from mycellm.ledger.memberships import InviteRecord, Membership, MembershipBook
from mycellm.ledger.store import Store


def invoke(data_dir: Path, *args: str) -> Any:
    return CliRunner().invoke(app, ["network", *args, "--data-dir", str(data_dir)], env={"COLUMNS": "200"})


def ok(data_dir: Path, *args: str) -> Any:
    result = invoke(data_dir, *args)
    assert result.exit_code == 0, result.output
    return result


def one_line_failure(result: Any, code: int, message: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mycellm: ") and message in lines[0], result.stderr


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "authority"


@pytest.fixture
def identity(data_dir: Path) -> NodeIdentity:
    return load_or_create_identity(data_dir, node_name="authority")


def account_key_of(identity: NodeIdentity) -> bytes:
    assert identity.account_key is not None
    return raw_public_key(identity.account_key)


def in_book(data_dir: Path, work: Any) -> Any:
    async def run() -> Any:
        store = await Store.open(f"sqlite+aiosqlite:///{data_dir / 'mycellm.db'}")
        try:
            return await work(MembershipBook(store.engine))
        finally:
            await store.close()

    return asyncio.run(run())


def test_create_private_and_public_default_and_named_networks(data_dir: Path, identity: NodeIdentity) -> None:
    key = account_key_of(identity)
    private = ok(data_dir, "create", "lab", "--private", "--bootstrap", "203.0.113.7:8421")
    assert private.stdout.strip() == network_id_for(key, "lab")
    default = ok(data_dir, "create", "home", "--public", "--default")
    assert default.stdout.strip() == network_id_for(key) == identity.account_id
    path = data_dir / "networks" / network_id_for(key, "lab") / DESCRIPTION_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert {stat.S_IMODE(os.stat(folder).st_mode) for folder in (path.parent, path.parent.parent)} == {0o700}
    description = NetworkDescription.from_bytes(path.read_bytes())
    description.verify()
    assert (description.name, description.visibility, description.default, description.serial) == (
        "lab",
        "private",
        False,
        0,
    )
    assert description.bootstrap == ("203.0.113.7:8421",)
    assert description.prices == NetworkPrices.from_settings(PriceSettings())

    one_line_failure(invoke(data_dir, "create", "lab", "--public"), 1, "already hosts a network called 'lab'")
    one_line_failure(
        invoke(data_dir, "create", "other", "--private", "--default"), 1, "default network exists"
    )
    listed = json.loads(ok(data_dir, "list", "--json").stdout)
    assert [(item["name"], item["visibility"], item["default"]) for item in listed] == [
        ("home", "public", True),
        ("lab", "private", False),
    ]
    table = ok(data_dir, "list").stdout
    assert "home" in table and "lab" in table and "203.0.113.7:8421" in table

    shown = json.loads(ok(data_dir, "show", "lab", "--json").stdout)
    assert shown["network_id"] == network_id_for(key, "lab") and shown["serial"] == 0
    assert shown["prices"]["tier_prices_micro"]["fast"] == 100_000
    assert shown["join_policy"] == {"max_joins_per_address_per_hour": 5, "max_joins_per_address_per_day": 20}
    by_prefix = ok(data_dir, "show", identity.account_id[:10]).stdout
    assert "home (default network)" in by_prefix and "visibility:  public" in by_prefix
    assert "join policy: 5 an hour, 20 a day" in by_prefix
    one_line_failure(invoke(data_dir, "show", "nowhere"), 1, "no hosted network is called 'nowhere'")


def test_bad_create_input_is_refused_and_writes_nothing(data_dir: Path) -> None:
    for args, message in [
        (("create", "lab"), "--private (invite only) or --public"),
        (("create", "bad name", "--private"), "is not 1..64 characters"),
        (("create", "lab", "--private", "--bootstrap", "nowhere"), "is not host:port"),
        (
            ("create", "lab", "--private", "--bootstrap", "a.example:1", "--bootstrap", "a.example:1"),
            "repeat",
        ),
    ]:
        one_line_failure(invoke(data_dir, *args), 2, message)
    assert not data_dir.exists()


def test_a_node_without_its_account_key_is_refused(
    data_dir: Path, identity: NodeIdentity, tmp_path: Path
) -> None:
    device_dir = tmp_path / "laptop"
    add_device(data_dir, "laptop", device_dir)
    one_line_failure(invoke(device_dir, "create", "lab", "--private"), 1, "holds no account key")
    assert not (device_dir / "networks").exists()


def test_invites_are_signed_recorded_and_checked(data_dir: Path, identity: NodeIdentity) -> None:
    ok(data_dir, "create", "lab", "--private", "--bootstrap", "203.0.113.7:8421")
    for args, message in [
        (("--expires", "24"), "is not a whole number followed by s, m, h or d"),
        (("--expires", "0h"), "is not a whole number"),
        (("--expires", "9999d"), "over a year"),
        (("--role", "owner"), "role 'owner' is not one of seeder, consumer, relay, admin"),
        (("--max-uses", "0"), "--max-uses must be 1..1000"),
        (("--bind-key", "abc"), "--bind-key is an account's public key"),
    ]:
        one_line_failure(invoke(data_dir, "invite", "lab", *args), 2, message)
    assert not (data_dir / "mycellm.db").exists()

    result = ok(data_dir, "invite", "lab", "--max-uses", "5", "--expires", "24h", "--role", "seeder")
    lines = result.stdout.splitlines()
    text = next(line for line in lines if line.startswith("token: ")).removeprefix("token: ")
    link = next(line for line in lines if line.startswith("link: ")).removeprefix("link:").strip()
    assert link == f"mycellm://join?token={text}"
    token = InviteToken.from_text(text)
    assert InviteToken.from_text(link) == token
    token.verify()
    token.check_for(load_network(data_dir, "lab").description)
    assert (token.role, token.max_uses, token.bind_key) == ("seeder", 5, None)
    assert token.bootstrap == ("203.0.113.7:8421",)
    assert abs(token.expires_at - token.issued_at - 86400) == 0 and abs(token.issued_at - time.time()) < 60
    record: InviteRecord = in_book(data_dir, lambda book: book.invite(token.network_id, token.nonce))
    assert (record.max_uses, record.uses, record.role, record.bind_key) == (5, 0, "seeder", None)

    bound_key = os.urandom(32)
    bound = ok(data_dir, "invite", "lab", "--bind-key", bound_key.hex(), "--expires", "30m")
    bound_text = next(line for line in bound.stdout.splitlines() if line.startswith("token: "))[7:]
    bound_token = InviteToken.from_text(bound_text)
    assert bound_token.bind_key == bound_key and bound_token.expires_at - bound_token.issued_at == 1800
    bound_record = in_book(data_dir, lambda book: book.invite(bound_token.network_id, bound_token.nonce))
    assert bound_record.bind_key == bound_key and bound_record.max_uses == 1


def redeem(data_dir: Path, identity: NodeIdentity, token: InviteToken, member_key: bytes) -> Membership:
    assert identity.account_key is not None
    account_key = identity.account_key
    description = load_network(data_dir, token.network_name).description

    def issue() -> tuple[bytes, float]:
        certificate = issue_membership(account_key, description, member_key, role=token.role)
        return certificate.to_bytes(), float(certificate.expires_at)

    account_id = hashlib.sha256(member_key).hexdigest()
    return in_book(
        data_dir, lambda book: book.redeem(token.network_id, token.nonce, account_id, time.time(), issue)
    )


def test_members_are_listed_and_revoked(data_dir: Path, identity: NodeIdentity) -> None:
    network_id = ok(data_dir, "create", "lab", "--private").stdout.strip()
    result = ok(data_dir, "invite", "lab", "--max-uses", "2")
    token = InviteToken.from_text(
        next(line for line in result.stdout.splitlines() if line.startswith("token: "))[7:]
    )
    first, second = os.urandom(32), os.urandom(32)
    member = redeem(data_dir, identity, token, first)
    redeem(data_dir, identity, token, second)
    members = json.loads(ok(data_dir, "members", "lab", "--json").stdout)
    assert sorted(item["account_id"] for item in members) == sorted(
        hashlib.sha256(key).hexdigest() for key in (first, second)
    )
    assert {item["role"] for item in members} == {"consumer"} and all(
        item["revoked_at"] is None for item in members
    )

    one_line_failure(invoke(data_dir, "revoke", "lab", "abc"), 2, "prefix of 8+ hex characters")
    one_line_failure(invoke(data_dir, "revoke", "lab", "0" * 64), 1, "no member account id starts with")
    revoked = ok(data_dir, "revoke", "lab", member.account_id[:12])
    assert "member revocation list serial 1, 1 member(s) revoked" in revoked.stdout
    path = data_dir / "networks" / network_id / MEMBER_REVOCATIONS_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    revocations = MemberRevocationList.from_bytes(path.read_bytes())
    description = load_network(data_dir, "lab").description
    revocations.verify(description)
    assert revocations.serial == 1 and revocations.is_revoked(first) and not revocations.is_revoked(second)
    kept = in_book(data_dir, lambda book: book.membership(network_id, member.account_id))
    assert kept.revoked_at is not None

    again = ok(data_dir, "revoke", "lab", member.account_id)
    assert "serial 1, 1 member(s) revoked" in again.stdout
    other = hashlib.sha256(second).hexdigest()
    assert "serial 2, 2 member(s) revoked" in ok(data_dir, "revoke", "lab", other).stdout
    table = ok(data_dir, "members", "lab").stdout
    assert table.count("revoked") == 2
    assert json.loads(ok(data_dir, "show", "lab", "--json").stdout)["member_revocations"] == {
        "serial": 2,
        "revoked": 2,
    }


def test_next_description_counts_up_only_on_a_change(data_dir: Path, identity: NodeIdentity) -> None:
    ok(data_dir, "create", "lab", "--private")
    network = load_network(data_dir, "lab")
    assert next_description(identity, network, visibility="private") is network
    changed = next_description(identity, network, bootstrap=["198.51.100.1:8421"])
    assert changed.description.serial == 1 and changed.description.bootstrap == ("198.51.100.1:8421",)
    reloaded = load_network(data_dir, "lab").description
    assert reloaded == changed.description
    reloaded.verify()


def test_durations() -> None:
    assert [parse_duration(text) for text in ("45s", "30m", "24h", "7d")] == [45, 1800, 86400, 604800]
    for text in ("", "h", "-1h", "1.5h", "1w", "01h"):
        with pytest.raises(ValueError):
            parse_duration(text)
