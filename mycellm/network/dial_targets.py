"""What a node dials: its bootstrap peers as configured, peers it was linked to before, and a few learned hints.

Bootstrap peers (the config's and the held networks' descriptions') are dialed whatever their
address. Peers linked before are redialed at the address their link gave, if the address policy
allows it; learned hints (``peer_hints``) come last and are rate limited by the Dialer. No list
is taken in peer id order: ids are cheap to grind, so remembered peers go in an order drawn at
random for this node.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from mycellm.config import NodeSettings, join_address
from mycellm.network.dialer import Dialer
from mycellm.network.network_links import NetworkLinks
from mycellm.network.peer_addresses import OwnAddress
from mycellm.network.peer_hints import Hint, PeerHints
from mycellm.network.registry import PeerRegistry
from mycellm.network.session import SessionTable
from mycellm.types import PeerId


class DialTargets:
    """The Dialer's ``wanted`` and ``hinted`` lists of one node (``own``: its id and where it listens)."""

    def __init__(
        self,
        settings: NodeSettings,
        own: OwnAddress,
        sessions: SessionTable,
        registry: PeerRegistry,
        networks: NetworkLinks,
        hints: PeerHints,
    ) -> None:
        self._settings = settings
        self._own_peer_id = own.peer_id
        self._own_address = own.address
        self._sessions = sessions
        self._registry = registry
        self._networks = networks
        self._hints = hints
        self._policy = hints.policy

    def dialer(self, dial: Callable[[str], Awaitable[bool]]) -> Dialer:
        """The Dialer of these lists: ``dial`` links to one address."""
        return Dialer(
            self.wanted,
            dial,
            self._settings.reconnect_max_backoff_s,
            hinted=self.hinted,
            max_hint_dials_per_minute=self._settings.max_hint_dials_per_minute,
        )

    def _linked(self) -> set[str]:
        served = self._sessions.served_sessions()
        return {session.address for session in served if session.address} | {
            join_address(*session.link.remote_address) for session in served if session.link.dialed
        }

    def bootstrap(self) -> list[str]:
        bootstrap = [*self._settings.bootstrap_peers]
        for network in self._networks.held.networks():
            bootstrap += [item for item in network.description.bootstrap if item not in bootstrap]
        return bootstrap

    def _room(self) -> int:
        return self._settings.max_peers - len(self._sessions)

    def wanted(self) -> list[str]:
        """Bootstrap peers not linked now, then peers linked before (up to the room for links)."""
        linked, own = self._linked(), self._own_address()
        wanted = [address for address in self.bootstrap() if address not in linked and address != own]
        remembered = [
            record
            for record in self._registry.records()
            if record.address
            and record.last_seen is not None  # linked before, not only heard of
            and record.peer_id != self._own_peer_id
            and self._sessions.routed(PeerId(record.peer_id)) is None
            and record.address not in linked
            and record.address != own
            and record.address not in wanted
            and self._policy.allows(record.address)
        ]
        remembered.sort(key=lambda record: self._hints.rank(record.peer_id))
        room = self._room() - len(wanted)
        return wanted + [record.address for record in remembered[: max(0, room)] if record.address]

    def hinted(self) -> list[str]:
        """Learned addresses to try, in the hints' order, as many as there is room for links."""
        room = self._room()
        if room <= 0:
            return []
        linked, own = self._linked(), self._own_address()

        def skip(hint: Hint) -> bool:
            return (
                hint.address in linked
                or hint.address == own
                or hint.peer_id == self._own_peer_id
                or self._sessions.routed(PeerId(hint.peer_id)) is not None
            )

        return self._hints.pick(room, skip)
