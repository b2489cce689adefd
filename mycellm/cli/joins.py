"""Commands of a network's members: join a network at its bootstrap over QUIC, list the networks held, leave one."""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mycellm.cli.common import ConfigOption, DataDirOption, console, fail, settings_from
from mycellm.cli.network import JsonOption, network_app
from mycellm.config import NodeSettings
from mycellm.errors import MycellmError

if TYPE_CHECKING:
    from mycellm.federation.descriptions import NetworkDescription
    from mycellm.federation.held import HeldNetworks
    from mycellm.federation.member_revocations import MemberRevocationList
    from mycellm.federation.memberships import MembershipCertificate
    from mycellm.identity.keys import NodeIdentity


def _held(settings: NodeSettings) -> tuple[NodeIdentity, HeldNetworks]:
    from mycellm.federation.held import HeldNetworks
    from mycellm.identity.keys import load_or_create_identity

    identity = load_or_create_identity(settings.resolved_data_dir, node_name=settings.node_name)
    held = HeldNetworks(settings.resolved_data_dir, identity)
    held.refresh()
    return identity, held


@network_app.command("join")
def join(
    token: Annotated[str | None, typer.Argument(help="Invite token, or its mycellm://join link.")] = None,
    bootstrap: Annotated[
        str | None, typer.Option("--bootstrap", help="host:port of a public network's bootstrap (no token).")
    ] = None,
    network: Annotated[
        str | None, typer.Option("--network", help="Id of the public network to join.")
    ] = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Redeem an invite (or join a public network) at the bootstrap over QUIC and keep the membership."""
    from mycellm.federation.invites import InviteToken
    from mycellm.network.joining import request_join
    from mycellm.network.quic import QuicEndpoint

    settings = settings_from(config, data_dir=data_dir)
    if (token is None) == (bootstrap is None):
        raise fail("give an invite token, or --bootstrap host:port for a public network", 2)
    try:
        invite = None if token is None else InviteToken.from_text(token.strip())
        identity, held = _held(settings)
        addresses = list(invite.bootstrap) if invite is not None else [str(bootstrap)]
        if not addresses:
            raise fail("the invite names no bootstrap address", 2)

        async def ignore(link: object, stream: object) -> None:
            return None

        async def run() -> tuple[NetworkDescription, MembershipCertificate, MemberRevocationList | None]:
            endpoint = QuicEndpoint(identity, on_stream=ignore)
            try:
                last: Exception | None = None
                for address in addresses:
                    try:
                        return await request_join(endpoint, address, invite=invite, network_id=network)
                    except (OSError, MycellmError) as error:
                        last = error
                assert last is not None
                raise last
            finally:
                await endpoint.close()

        description, membership, revocations = asyncio.run(run())
        kept = held.store_joined(description, membership, revocations)
    except MycellmError as error:
        raise fail(f"join refused: {error.message}", 1) from error
    console.print(
        f"joined {kept.name} ({kept.network_id}) as {kept.membership.role}, until "
        f"{time.strftime('%Y-%m-%d', time.gmtime(kept.membership.expires_at))}",
        highlight=False,
    )


@network_app.command("joined")
def joined(config: ConfigOption = None, data_dir: DataDirOption = None, as_json: JsonOption = False) -> None:
    """Every network this node is in (hosted or joined), with its role and membership expiry."""
    settings = settings_from(config, data_dir=data_dir)
    try:
        _, held = _held(settings)
    except MycellmError as error:
        raise fail(error.message, 1) from error
    rows: list[dict[str, Any]] = [
        {
            "network_id": item.network_id,
            "name": item.name,
            "visibility": item.description.visibility,
            "hosted": item.hosted,
            "role": item.membership.role,
            "expires_at": item.membership.expires_at,
        }
        for item in held.networks()
    ]
    if as_json:
        console.print_json(json.dumps(rows))
        return
    for row in rows:
        console.print(
            f"{row['network_id'][:16]}  {row['name']:<16} {row['visibility']:<8} "
            f"{'hosted' if row['hosted'] else 'joined':<7} {row['role']}",
            highlight=False,
        )


@network_app.command("leave")
def leave(
    network: Annotated[str, typer.Argument(help="Name or id (8+ hex characters) of a joined network.")],
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Forget a joined network and its membership (a running node drops its links at the next heartbeat)."""
    settings = settings_from(config, data_dir=data_dir)
    try:
        _, held = _held(settings)
        chosen = held.find(network)
        held.leave(chosen.network_id)
    except MycellmError as error:
        raise fail(error.message, 1) from error
    console.print(f"left {chosen.name} ({chosen.network_id})", highlight=False)
