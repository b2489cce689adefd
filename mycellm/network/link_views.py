"""What a node's links look like from outside: connected peers as routing sees them, and the links as JSON."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mycellm.federation.held import HeldNetworks
from mycellm.identity.revocation_keeper import RevocationKeeper
from mycellm.network.registry import PeerRegistry
from mycellm.network.session import SessionTable
from mycellm.types import ModelInfo, NetworkId, PeerId


@dataclass(frozen=True, slots=True)
class LinkedPeer:
    """A connected peer as routing sees it: what it serves, and how near, busy and reliable it is."""

    peer_id: PeerId
    models: tuple[ModelInfo, ...]
    rtt_ms: float | None
    load: int
    reputation: float  # 0..1, decayed; 1 for a newcomer
    networks: tuple[NetworkId, ...] = ()  # the networks its link serves


def linked_peers(sessions: SessionTable, registry: PeerRegistry) -> list[LinkedPeer]:
    """Every connected peer with what it serves and its standing (the makings of its routes)."""
    linked: list[LinkedPeer] = []
    for session in sessions.routed_sessions():
        record = registry.reputation_of(session.peer_id)
        linked.append(
            LinkedPeer(
                peer_id=session.peer_id,
                models=session.hello.models,
                rtt_ms=record.rtt_ms if record else None,
                load=record.load if record else 0,
                reputation=record.reputation if record else 1.0,
                networks=tuple(sorted(session.networks)),
            )
        )
    return linked


def describe_links(
    own: Any,
    sessions: SessionTable,
    registry: PeerRegistry,
    revocations: RevocationKeeper,
    held: HeldNetworks,
) -> dict[str, Any]:
    """``own`` (its peer_id, port, address), its networks, links and what it knows of every peer, as JSON."""
    records = (registry.reputation_of(peer.peer_id) or peer for peer in registry.records())
    networks = {session.peer_id: sorted(session.networks) for session in sessions.routed_sessions()}
    return {
        "peer_id": own.peer_id,
        "quic_port": own.port,
        "address": own.address,
        "connected": sessions.peer_ids(),
        "links": {
            "inbound": sum(1 for link in own.endpoint.links if not link.dialed),
            "outbound": sum(1 for link in own.endpoint.links if link.dialed),
            "inbound_peak": own.endpoint.inbound_peak,
            "max_inbound": own.endpoint.limits.max_inbound_links,
        },
        "networks": [
            {
                "network_id": network.network_id,
                "name": network.name,
                "visibility": network.description.visibility,
                "hosted": network.hosted,
                "role": network.membership.role,
                "expires_at": network.membership.expires_at,
                "peers": sorted(peer for peer, ids in networks.items() if network.network_id in ids),
            }
            for network in held.networks()
        ],
        "peers": [
            record.model_dump(mode="json")
            | {"success_rate": record.success_rate, "reputation": record.reputation}
            for record in records
        ],
        "revocations": [
            {"account_id": item.account_id, "serial": item.serial, "revoked": len(item.revoked)}
            for item in revocations.lists()
        ],
    }
