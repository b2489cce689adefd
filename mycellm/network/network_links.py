"""The networks of a node's links: who is admitted to which network, each network's terms, and its news.

Every session serves the networks its peer proved membership of in its hello (the gate), and
nothing else: a request, a receipt, a peer list or a piece of network news of another network is
refused or not sent. Each network has its own terms (the authority's tiers and prices) and its own
settler over its own books. Network news (a newer signed description, a newer member revocation
list) is checked, kept and passed on to the other peers of that network only; a revoked member
loses that network on every link at once, and a link left with no network is closed. A newer
description changes that network's terms (tiers, the settler's prices) as soon as it is kept. A
peer's renewed membership, sent with the news, replaces the one its link was admitted with.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from mycellm.config import NodeSettings, PriceSettings
from mycellm.errors import FederationError, MycellmError
from mycellm.federation.descriptions import NetworkDescription
from mycellm.federation.gate import MembershipGate, NotAMemberError
from mycellm.federation.held import HeldNetwork, HeldNetworks, NetworkNews
from mycellm.federation.member_revocations import MemberRevocationList
from mycellm.federation.memberships import MembershipCertificate
from mycellm.identity.keys import NodeIdentity
from mycellm.ledger.pricing import PriceTable
from mycellm.ledger.receipts import Receipt, ReceiptTerms
from mycellm.network.messages import FraudProofMessage, HelloMessage, NetworkNewsMessage, ReceiptsMessage
from mycellm.network.peer_log import PEER_LOG
from mycellm.network.quic import PeerLink
from mycellm.network.registry import PeerRegistry
from mycellm.network.session import Session, SessionTable
from mycellm.network.settlement import CreditKeeper, NetworkTerms, Settler
from mycellm.types import NetworkId, PeerId

logger = logging.getLogger(__name__)

DISK_POLL_S = 0.5  # how often the networks' folders are looked at for changes made by the CLI

# A network's credit keeper, opened for it with its prices (the node's ledger, or a book in tests).
KeeperFactory = Callable[[NetworkId, PriceSettings], Awaitable[CreditKeeper]]


def news_message(news: NetworkNews) -> NetworkNewsMessage:
    return NetworkNewsMessage(
        descriptions=tuple(item.to_bytes() for item in news.descriptions),
        revocations=tuple(item.to_bytes() for item in news.revocations),
    )


class NetworkLinks:
    """The per-network side of a PeerService: admission of links, terms and settlers, news."""

    def __init__(
        self,
        settings: NodeSettings,
        identity: NodeIdentity,
        sessions: SessionTable,
        registry: PeerRegistry,
        keepers: KeeperFactory | None,
        *,
        drop: Callable[[Session, str], None],
        on_change: Callable[[], None],
    ) -> None:
        self._settings = settings
        self._identity = identity
        self._sessions = sessions
        self._registry = registry
        self._keepers = keepers
        self._drop = drop
        self._on_change = on_change
        self.held = HeldNetworks(settings.resolved_data_dir, identity)
        self._gate = MembershipGate(self.held)
        self._terms: dict[NetworkId, NetworkTerms] = {}
        self._loading = asyncio.Lock()

    # -- networks and their terms ---------------------------------------------------------------

    async def load(self) -> NetworkNews:
        """Read the networks from disk (again), open the terms of new ones; what is new comes back.

        The terms of a network are open before the node holds it: a link admitted in it, or a
        hello presenting it, always finds them."""
        async with self._loading:
            loaded = self.held.read()
            for network in loaded.values():
                held, current = self._terms.get(network.network_id), self.held.get(network.network_id)
                if held is None or current is None or network.description.serial > current.description.serial:
                    await self._open_terms(network, held)
            news = self.held.adopt(loaded)
            for network_id in set(self._terms) - self.held.ids():
                del self._terms[network_id]  # left: its links lose it at the next check
            return news

    async def watch(self, interval_s: float = DISK_POLL_S) -> None:
        """Notice within ``interval_s`` (not a heartbeat) a network joined, left, renewed or
        re-described on disk, as the CLI does while the node runs; load and spread it."""
        stamp = self.held.stamp()
        while True:
            await asyncio.sleep(interval_s)
            if (now := self.held.stamp()) == stamp:
                continue
            stamp = now
            try:
                await self.spread(await self.load())
            except (MycellmError, OSError) as error:
                logger.warning("could not load the networks changed on disk: %s", error)

    async def _open_terms(self, network: HeldNetwork, held: NetworkTerms | None) -> None:
        prices = network.description.prices.to_settings(self._settings.credits)
        network_id = network.network_id
        settler = held.settler if held is not None else None
        if settler is not None:  # a newer description: the network's new prices, in its books too
            keeper = await self._keepers(network_id, prices) if self._keepers is not None else None
            settler.reprice(PriceTable(prices), keeper)
        elif self._keepers is not None:
            settler = Settler(
                self._identity,
                PriceTable(prices),
                network_id,
                await self._keepers(network_id, prices),
                self._registry,
                on_settled=lambda receipt, source: self._sessions.broadcast(
                    ReceiptsMessage(receipts=(receipt,)), skip=source, network_id=network_id
                ),
                on_fraud=lambda proof, source: self._sessions.broadcast(
                    FraudProofMessage(
                        first_kind=proof[0], first=proof[1], second_kind=proof[2], second=proof[3]
                    ),
                    skip=source,
                    network_id=network_id,
                ),
            )
        self._terms[network_id] = NetworkTerms(network_id, dict(network.description.model_tiers), settler)

    def default_id(self) -> NetworkId:
        network = self.held.default(self._settings.network)
        if network is None:
            raise NotAMemberError("this node is in no network: create one or join one")
        return network.network_id

    def terms(self, network_id: NetworkId | None) -> NetworkTerms:
        """The terms of one of this node's networks (None: the default one); NotAMemberError if not one."""
        chosen = network_id or self.default_id()
        terms = self._terms.get(chosen)
        if terms is None:
            raise NotAMemberError(f"this node is not in network {chosen[:16]}")
        return terms

    def settlers(self) -> list[Settler]:
        return [terms.settler for terms in self._terms.values() if terms.settler is not None]

    def memberships(self) -> tuple[bytes, ...]:
        """What this node presents in its hellos: its membership of each of its networks."""
        return tuple(network.membership.to_bytes() for network in self.held.networks())

    # -- links ----------------------------------------------------------------------------------

    def admit(self, link: PeerLink, hello: HelloMessage) -> dict[NetworkId, MembershipCertificate | None]:
        """The networks ``link`` may serve, from the memberships in its hello (NotAMemberError: none)."""
        return self._gate.shared(hello.memberships, link.certificate)

    def link_terms(self, link: PeerLink, network_id: NetworkId | None) -> NetworkTerms:
        """The terms for a request a peer sent in ``network_id`` over ``link``, if the link serves it."""
        session = self._sessions.of_link(link)
        if network_id is None:
            raise NotAMemberError("the request names no network")
        if session is None or network_id not in session.networks:
            raise NotAMemberError(f"this link does not serve network {network_id[:16]}")
        return self.terms(network_id)

    def session_in(self, session: Session, network_id: NetworkId | None) -> Session:
        chosen = network_id or self.default_id()
        if chosen not in session.networks:
            raise NotAMemberError(f"peer {session.peer_id[:12]} is not in network {chosen[:16]}")
        return session

    def recheck(self) -> None:
        """Take from every link the networks it no longer serves (expired, revoked, left); close the empty."""
        changed = False
        for session in self._sessions.served_sessions():
            kept = self._gate.still_shared(session.networks, session.link.certificate)
            if len(kept) == len(session.networks):
                continue
            lost = set(session.networks) - set(kept)
            logger.warning(
                "peer %s left network(s) %s", session.peer_id[:12], ", ".join(n[:12] for n in lost)
            )
            if not kept:
                self._drop(session, "no network in common any more")
                continue
            session.networks = dict(kept)
            changed = True
        if changed:
            self._on_change()

    # -- news -----------------------------------------------------------------------------------

    def greeting(self, session: Session) -> NetworkNewsMessage | None:
        """The descriptions and member revocations of the networks ``session`` serves."""
        news = NetworkNews()
        for network_id in session.networks:
            network = self.held.get(network_id)
            if network is not None:
                news.descriptions.append(network.description)
                if network.revocations is not None:
                    news.revocations.append(network.revocations)
        return news_message(news) if news else None

    async def spread(self, news: NetworkNews, source: PeerId | None = None) -> None:
        """Apply news held here (terms, links) and pass each item on to its network's other peers."""
        if not news:
            return
        for description in news.descriptions:
            network = self.held.get(description.network_id)
            if network is not None:
                await self._open_terms(network, self._terms.get(network.network_id))
        self.recheck()
        for description in news.descriptions:
            message = news_message(NetworkNews(descriptions=[description]))
            self._sessions.broadcast(message, skip=source, network_id=NetworkId(description.network_id))
        for revocations in news.revocations:
            message = news_message(NetworkNews(revocations=[revocations]))
            self._sessions.broadcast(message, skip=source, network_id=NetworkId(revocations.network_id))
        self._on_change()

    async def heard(self, session: Session, message: NetworkNewsMessage) -> None:
        """News a peer passed on: only of networks it shares with this node, each verified."""
        for data in message.memberships:
            self._peer_renewed(session, data)
        news = NetworkNews()
        for data in message.descriptions:
            try:
                description = NetworkDescription.from_bytes(data)
                if description.network_id in session.networks and self.held.accept_description(description):
                    news.descriptions.append(description)
            except FederationError as error:
                PEER_LOG.warning(
                    logger,
                    session.peer_id,
                    "a description from %s was refused: %s",
                    session.peer_id[:12],
                    error.message,
                )
        for data in message.revocations:
            try:
                revocations = MemberRevocationList.from_bytes(data)
                if revocations.network_id in session.networks and self.held.accept_revocations(revocations):
                    news.revocations.append(revocations)
            except FederationError as error:
                PEER_LOG.warning(
                    logger,
                    session.peer_id,
                    "revocations from %s were refused: %s",
                    session.peer_id[:12],
                    error.message,
                )
        await self.spread(news, source=session.peer_id)

    def _peer_renewed(self, session: Session, data: bytes) -> None:
        """A peer's own renewed membership of a network its link serves: the link goes on with it."""
        try:
            certificate = MembershipCertificate.from_bytes(data)
        except FederationError as error:
            PEER_LOG.warning(
                logger,
                session.peer_id,
                "a membership from %s was refused: %s",
                session.peer_id[:12],
                error.message,
            )
            return
        network_id = NetworkId(certificate.network_id)
        held = session.networks.get(network_id)
        if held is None or certificate.serial <= held.serial:
            return  # not served, the authority's device (it needs none), or not newer
        if self._gate.still_shared({network_id: certificate}, session.link.certificate):
            session.networks[network_id] = certificate
        else:
            logger.warning("a renewed membership from %s does not hold", session.peer_id[:12])

    # -- renewals of this node's memberships --------------------------------------------------------

    def authority_addresses(self, network: HeldNetwork) -> list[str]:
        """Where ``network``'s authority may answer: its account's devices linked now, then its bootstrap."""
        key = network.description.authority_public_key
        linked = [
            session.address
            for session in self._sessions.served_sessions()
            if session.address and session.link.certificate.account_public_key == key
        ]
        return list(dict.fromkeys([*linked, *network.description.bootstrap]))

    async def renewed(
        self,
        description: NetworkDescription,
        membership: MembershipCertificate,
        revocations: MemberRevocationList | None,
    ) -> HeldNetwork:
        """Keep what the authority answered a renewal with (the membership first: if it does not hold,
        nothing is kept) and send the new membership to the network's peers."""
        network = self.held.accept_membership(membership)
        news = NetworkNews()
        if self.held.accept_description(description):
            news.descriptions.append(description)
        if revocations is not None and self.held.accept_revocations(revocations):
            news.revocations.append(revocations)
        await self.spread(news)
        renewal = NetworkNewsMessage(memberships=(membership.to_bytes(),))
        self._sessions.broadcast(renewal, network_id=network.network_id)
        return self.held.get(network.network_id) or network

    def observe_fraud(self, session: Session, message: FraudProofMessage) -> None:
        """A fraud proof a peer passed on, to the settler of each network the link serves."""
        proof = (message.first_kind, message.first, message.second_kind, message.second)
        for network_id in session.networks:
            terms = self._terms.get(network_id)
            if terms is not None and terms.settler is not None:
                terms.settler.observe_fraud(proof, session.peer_id)

    def observe(self, session: Session, receipts: tuple[bytes, ...]) -> None:
        """Receipts a peer passed on, each to its own network's settler (of networks the link serves)."""
        for encoded in receipts:
            try:
                network_id = NetworkId(ReceiptTerms.from_bytes(Receipt.from_bytes(encoded).terms).network_id)
            except MycellmError:  # malformed: nothing to record
                continue
            terms = self._terms.get(network_id)
            if network_id in session.networks and terms is not None and terms.settler is not None:
                terms.settler.observe((encoded,), session.peer_id)
