"""Commands of a network's authority: create, show and publish networks; invite, list and revoke members."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, get_args

import typer
from rich.table import Table

from mycellm.cli.common import ConfigOption, DataDirOption, app, console, fail, settings_from
from mycellm.config import NodeSettings
from mycellm.errors import IdentityError, MycellmError

if TYPE_CHECKING:
    from mycellm.identity.keys import NodeIdentity
    from mycellm.ledger.memberships import Membership, MembershipBook

network_app = typer.Typer(
    no_args_is_help=True, help="Networks this node's account hosts: create, publish, invite, revoke."
)


app.add_typer(network_app, name="network")


Answer = TypeVar("Answer")

NetworkArgument = Annotated[str, typer.Argument(help="Network name, or id (a prefix of 8+ hex characters).")]

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _failed(error: MycellmError) -> typer.Exit:
    kind = "identity error" if isinstance(error, IdentityError) else "network error"
    return fail(f"{kind}: {error.message}", 1)


def _identity(settings: NodeSettings) -> NodeIdentity:
    from mycellm.identity.keys import load_or_create_identity

    return load_or_create_identity(settings.resolved_data_dir, node_name=settings.node_name)


def _with_book(settings: NodeSettings, work: Callable[[MembershipBook], Awaitable[Answer]]) -> Answer:
    """Run ``work`` on the authority's books in the node's database, opened (and migrated) for it."""
    from mycellm.ledger.memberships import MembershipBook
    from mycellm.ledger.store import Store

    async def run() -> Answer:
        store = await Store.open(settings.resolved_database_url)
        try:
            return await work(MembershipBook(store.engine))
        finally:
            await store.close()

    return asyncio.run(run())


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(timestamp))


def _check_bootstrap(bootstrap: list[str]) -> None:
    from mycellm.federation.signed import MAX_BOOTSTRAP_ADDRESSES, check_address

    try:
        for address in bootstrap:
            check_address(address)
    except ValueError as error:
        raise fail(str(error), 2) from error
    if len(set(bootstrap)) != len(bootstrap):
        raise fail("bootstrap addresses must not repeat", 2)
    if len(bootstrap) > MAX_BOOTSTRAP_ADDRESSES:
        raise fail(f"at most {MAX_BOOTSTRAP_ADDRESSES} bootstrap addresses", 2)


@network_app.command("create")
def network_create(
    name: Annotated[str, typer.Argument(help="Network name: 1..64 of A-Z a-z 0-9 . _ -")],
    public: Annotated[
        bool | None, typer.Option("--public/--private", help="Anyone may join, or only by invite.")
    ] = None,
    default: Annotated[
        bool, typer.Option("--default", help="The account's default network: its id is the account id.")
    ] = False,
    bootstrap: Annotated[
        list[str] | None, typer.Option("--bootstrap", help="host:port members dial first (repeatable).")
    ] = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Sign a new network's description with this node's account key and keep it; print its id."""
    from mycellm.federation.authority import create_network, model_tiers_from
    from mycellm.federation.descriptions import NetworkPrices
    from mycellm.federation.network_ids import check_network_name

    if public is None:
        raise fail("say whether the network is --private (invite only) or --public", 2)
    try:
        check_network_name(name)
    except ValueError as error:
        raise fail(str(error), 2) from error
    addresses = list(bootstrap or [])
    _check_bootstrap(addresses)
    settings = settings_from(config, data_dir=data_dir)
    try:
        prices = NetworkPrices.from_settings(settings.credits)
    except MycellmError as error:
        raise fail(f"config error: credits: {error.message}", 2) from error
    try:
        network = create_network(
            settings.resolved_data_dir,
            _identity(settings),
            name=name,
            visibility="public" if public else "private",
            default=default,
            bootstrap=addresses,
            prices=prices,
            model_tiers=model_tiers_from(settings),
        )
    except MycellmError as error:
        raise _failed(error) from error
    console.print(network.network_id, highlight=False)


@network_app.command("list")
def network_list(
    config: ConfigOption = None, data_dir: DataDirOption = None, as_json: JsonOption = False
) -> None:
    """List the networks this node's account hosts."""
    from mycellm.federation.authority import hosted_networks, network_summary

    settings = settings_from(config, data_dir=data_dir)
    try:
        networks = hosted_networks(settings.resolved_data_dir)
    except MycellmError as error:
        raise _failed(error) from error
    if as_json:
        console.print_json(json.dumps([network_summary(network) for network in networks]))
        return
    table = Table("network id", "name", "visibility", "default", "serial", "bootstrap")
    for network in networks:
        description = network.description
        table.add_row(
            description.network_id[:16],
            description.name,
            description.visibility,
            "yes" if description.default else "",
            str(description.serial),
            ", ".join(description.bootstrap) or "-",
        )
    console.print(table)


@network_app.command("show")
def network_show(
    network: NetworkArgument,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one hosted network: id, name, visibility, serial, bootstrap, prices and join policy."""
    from mycellm.federation.authority import load_network, network_summary

    settings = settings_from(config, data_dir=data_dir)
    try:
        data = network_summary(load_network(settings.resolved_data_dir, network))
    except MycellmError as error:
        raise _failed(error) from error
    if as_json:
        console.print_json(json.dumps(data))
        return
    prices, policy = data["prices"], data["join_policy"]
    tiers = ", ".join(
        f"{tier} {micro / 1e6:g}" for tier, micro in sorted(prices["tier_prices_micro"].items())
    )
    lines = [
        f"network id:  {data['network_id']}",
        f"name:        {data['name']}{' (default network)' if data['default'] else ''}",
        f"visibility:  {data['visibility']}",
        f"serial:      {data['serial']} (issued {_utc(data['issued_at'])})",
        f"bootstrap:   {', '.join(data['bootstrap']) or '-'}",
        f"prices:      {tiers} credits per 1,000 tokens; other tiers {prices['unknown_tier_price_micro'] / 1e6:g}",
        f"             prompt weight {prices['prompt_weight_ppm'] / 1e6:g}, relay fee {prices['relay_fee_ppm'] / 1e6:g},"
        f" initial grant {prices['initial_grant_micro'] / 1e6:g}",
        f"model tiers: {', '.join(f'{model} {tier}' for model, tier in sorted(data['model_tiers'].items())) or '-'}",
        f"join policy: {policy['max_joins_per_address_per_hour']} an hour, {policy['max_joins_per_address_per_day']}"
        " a day per address",
    ]
    revocations = data["member_revocations"]
    if revocations is not None:
        lines.append(f"revocations: serial {revocations['serial']}, {revocations['revoked']} member(s)")
    for line in lines:
        console.print(line, highlight=False, markup=False, soft_wrap=True)


@network_app.command("publish")
def network_publish(
    network: NetworkArgument, config: ConfigOption = None, data_dir: DataDirOption = None
) -> None:
    """Sign the network's next description with the config's prices (``credits:``) and tiers (``models:``)."""
    from mycellm.federation.authority import load_network, model_tiers_from, next_description
    from mycellm.federation.descriptions import NetworkPrices

    settings = settings_from(config, data_dir=data_dir)
    try:
        hosted = load_network(settings.resolved_data_dir, network)
        prices, tiers = NetworkPrices.from_settings(settings.credits), model_tiers_from(settings)
        published = next_description(_identity(settings), hosted, prices=prices, model_tiers=tiers)
    except MycellmError as error:
        raise _failed(error) from error
    change = "unchanged" if published is hosted else "published; running nodes pass it on"
    console.print(f"{published.name}: description serial {published.description.serial} ({change})")


def _invite_terms(role: str, max_uses: int, expires: str, bind_key: str | None) -> tuple[int, bytes | None]:
    """Check an invite's terms before anything is loaded or written: the validity and the bound key."""
    from mycellm.federation.authority import parse_duration
    from mycellm.federation.invites import MAX_INVITE_USES
    from mycellm.federation.signed import MemberRole

    if role not in get_args(MemberRole):
        raise fail(f"role {role[:40]!r} is not one of {', '.join(get_args(MemberRole))}", 2)
    if not 1 <= max_uses <= MAX_INVITE_USES:
        raise fail(f"--max-uses must be 1..{MAX_INVITE_USES}, not {max_uses}", 2)
    try:
        validity_s = parse_duration(expires)
    except ValueError as error:
        raise fail(f"--expires: {error}", 2) from error
    if bind_key is None:
        return validity_s, None
    if not re.fullmatch(r"[0-9a-fA-F]{64}", bind_key):
        raise fail("--bind-key is an account's public key: 64 hex digits (32 bytes)", 2)
    return validity_s, bytes.fromhex(bind_key)


@network_app.command("invite")
def network_invite(
    network: NetworkArgument,
    max_uses: Annotated[int, typer.Option("--max-uses", help="How many accounts may redeem it.")] = 1,
    expires: Annotated[str, typer.Option("--expires", help="Valid for: 30m, 24h, 7d.")] = "7d",
    role: Annotated[str, typer.Option("--role", help="seeder, consumer, relay or admin.")] = "consumer",
    bind_key: Annotated[
        str | None, typer.Option("--bind-key", help="Only this account (hex public key) may redeem it.")
    ] = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Sign an invite to a hosted network, record it in the authority's books and print it."""
    from mycellm.federation.authority import invite, load_network

    validity_s, bound = _invite_terms(role, max_uses, expires, bind_key)
    settings = settings_from(config, data_dir=data_dir)
    try:
        hosted = load_network(settings.resolved_data_dir, network)
        token = invite(
            _identity(settings),
            hosted,
            role=role,  # type: ignore[arg-type]  # checked against MemberRole above
            max_uses=max_uses,
            validity_s=validity_s,
            bind_key=bound,
        )

        async def record(book: MembershipBook) -> bool:
            return await book.record_invite(
                token.network_id,
                token.nonce,
                token.role,
                token.max_uses,
                float(token.expires_at),
                token.bind_key,
                now=float(token.issued_at),
            )

        _with_book(settings, record)
    except MycellmError as error:
        raise _failed(error) from error
    bound_text = f", only for account key {bind_key[:16]}…" if bind_key else ""
    console.print(
        f"invite to {hosted.name} ({hosted.network_id[:16]}): role {token.role}, {token.max_uses} use(s),"
        f" expires {_utc(token.expires_at)}{bound_text}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    console.print(f"token: {token.to_text()}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"link:  {token.to_url()}", highlight=False, markup=False, soft_wrap=True)


def _member_data(member: Membership) -> dict[str, Any]:
    return {
        "account_id": member.account_id,
        "role": member.role,
        "issued_at": member.issued_at,
        "expires_at": member.expires_at,
        "revoked_at": member.revoked_at,
        "source": member.source,
    }


@network_app.command("members")
def network_members(
    network: NetworkArgument,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """List a hosted network's members from the authority's books, revoked ones included."""
    from mycellm.federation.authority import load_network

    settings = settings_from(config, data_dir=data_dir)
    try:
        hosted = load_network(settings.resolved_data_dir, network)
        members = _with_book(settings, lambda book: book.members(hosted.network_id, include_revoked=True))
    except MycellmError as error:
        raise _failed(error) from error
    if as_json:
        console.print_json(json.dumps([_member_data(member) for member in members]))
        return
    now = time.time()
    table = Table("account id", "role", "since", "expires", "status", "source")
    for member in members:
        status = (
            "revoked"
            if member.revoked_at is not None
            else "expired"
            if member.expires_at <= now
            else "active"
        )
        table.add_row(
            member.account_id[:16],
            member.role,
            _utc(member.issued_at),
            _utc(member.expires_at),
            status,
            member.source or "-",
        )
    console.print(table)


def _resolve_member(members: list[Membership], member: str) -> Membership:
    prefix = member.lower()
    if len(prefix) < 8 or not re.fullmatch(r"[0-9a-f]+", prefix):
        raise fail(f"member {member[:80]!r} is not an account id or a prefix of 8+ hex characters", 2)
    matching = [candidate for candidate in members if candidate.account_id.startswith(prefix)]
    if not matching:
        raise fail(f"network error: no member account id starts with {member}", 1)
    if len(matching) > 1:
        raise fail(f"network error: {len(matching)} member account ids start with {member}: give more", 1)
    return matching[0]


@network_app.command("revoke")
def network_revoke(
    network: NetworkArgument,
    member: Annotated[str, typer.Argument(help="Member account id, or a prefix of 8+ hex characters.")],
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Revoke a member in the authority's books and sign the network's next member revocation list."""
    from mycellm.federation.authority import authority_key, load_network, revoke_member
    from mycellm.federation.memberships import MembershipCertificate

    settings = settings_from(config, data_dir=data_dir)
    try:
        hosted = load_network(settings.resolved_data_dir, network)
        identity = _identity(settings)
        authority_key(identity)  # refuse a node without the account key before the books change
        members = _with_book(settings, lambda book: book.members(hosted.network_id, include_revoked=True))
        found = _resolve_member(members, member)
        certificate = MembershipCertificate.from_bytes(found.certificate)
        if certificate.member_account_id != found.account_id:
            raise fail(
                f"network error: the books' certificate of {found.account_id[:16]} names another account", 1
            )
        member_key = certificate.member_account_public_key
        _with_book(
            settings, lambda book: book.revoke_member(hosted.network_id, found.account_id, time.time())
        )
        revoked = revoke_member(identity, hosted, member_key)
    except MycellmError as error:
        raise _failed(error) from error
    serial, count = (
        (0, 0)
        if revoked.revocations is None
        else (revoked.revocations.serial, len(revoked.revocations.revoked))
    )
    console.print(
        f"revoked {found.account_id[:16]} from {hosted.name}: member revocation list serial {serial},"
        f" {count} member(s) revoked",
        highlight=False,
        soft_wrap=True,
    )
