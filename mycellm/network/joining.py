"""Joining a network over QUIC: the joiner's request at a bootstrap, and the authority's admission.

A join is the first and only exchange of its link: the joiner opens the link's first stream with a
``join?`` frame instead of a hello (it has no membership to present yet), the authority answers
with the network's description and the new membership (or an error frame) and closes the link.
The member account is the one of the link's TLS-authenticated device certificate, so nobody can
join on another account's behalf; the invite, if any, must be valid, for this authority's network,
and bound to that account if it is bound at all. Uses are counted in the authority's books, which
make ``max_uses`` exact and replays free (see ``mycellm.ledger.memberships``).

A renewal is the same exchange: a ``join?`` that presents the member's current membership instead
of an invite, answered by ``joined`` with a fresh certificate of the role the books give it (no
invite use, no public join counted), or refused, with nothing changed, for a member revoked in the
network's list or the books, a lapsed membership (its member joins again), and a membership that
is not the link's account's or not this authority's. When to ask is ``renewal``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from mycellm.config import NodeSettings, split_address
from mycellm.errors import FederationError, MembershipError, MycellmError, PeerError
from mycellm.federation.authority import authority_key
from mycellm.federation.descriptions import NetworkDescription
from mycellm.federation.held import HeldNetwork, HeldNetworks
from mycellm.federation.invites import InviteToken
from mycellm.federation.member_revocations import MemberRevocationList
from mycellm.federation.memberships import MembershipCertificate, check_member, issue_membership
from mycellm.identity.keys import NodeIdentity
from mycellm.ledger.memberships import MembershipBook
from mycellm.ledger.store import Store
from mycellm.network.messages import ErrorMessage, JoinedMessage, JoinRequestMessage, error_message
from mycellm.network.network_links import NetworkLinks
from mycellm.network.quic import FrameStream, PeerLink, QuicEndpoint
from mycellm.network.renewal import Admission, Renewals

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 10.0


class Admissions:
    """The authority's side: admits a joiner to one of the networks this node hosts, or says why not."""

    def __init__(
        self, identity: NodeIdentity, held: HeldNetworks, book: Callable[[], Awaitable[MembershipBook]]
    ) -> None:
        self._identity = identity
        self._held = held
        self._book = book

    async def answer(self, link: PeerLink, stream: FrameStream, request: JoinRequestMessage) -> None:
        """Answer the join on ``stream``, then close the link (a join link carries nothing else)."""
        what = "join" if request.membership is None else "renewal"
        try:
            reply = await self.admit(link, request)
            stream.send(reply, end=True)
            logger.info("%s of account %s answered", what, link.certificate.account_id[:12])
        except MycellmError as error:
            logger.warning("%s from %s refused: %s", what, link.peer_id[:12], error.message)
            with contextlib.suppress(MycellmError):
                stream.send(error_message(error), end=True)
        asyncio.get_running_loop().call_later(0.5, link.close, "join answered")

    async def admit(
        self, link: PeerLink, request: JoinRequestMessage, now: float | None = None
    ) -> JoinedMessage:
        now = time.time() if now is None else now
        device = link.certificate
        device.verify(now)
        if request.membership is not None:
            return await self._renew(link, request.membership, request, now)
        account_key, account_id = device.account_public_key, device.account_id
        source = link.remote_address[0]
        if request.invite is not None:
            token = InviteToken.from_bytes(request.invite)
            token.verify(now)
            network = self._hosted(token.network_id)
            token.check_for(network.description)
            token.check_redeemer(account_key)
            issue = self._issuer(network, account_key, token.role, now)
            book = await self._book()
            membership = await book.redeem(
                network.network_id, token.nonce, account_id, now, issue, source=source
            )
        else:
            elsewhere = self._redirect(request.network_id)
            if elsewhere is not None:  # a member, not the authority: the joiner goes to its bootstrap
                return JoinedMessage(description=elsewhere.description.to_bytes(), membership=b"")
            network = self._public(request.network_id)
            policy = network.description.join_policy
            issue = self._issuer(network, account_key, "seeder", now)
            book = await self._book()
            membership = await book.admit_public(
                network.network_id,
                account_id,
                source,
                now,
                policy.max_joins_per_address_per_hour,
                policy.max_joins_per_address_per_day,
                issue,
                role="seeder",
            )
        return _joined(network, membership.certificate)

    async def _renew(
        self, link: PeerLink, presented: bytes, request: JoinRequestMessage, now: float
    ) -> JoinedMessage:
        """A fresh membership for a current member presenting its valid one (see the module text)."""
        if request.invite is not None:
            raise MembershipError("a renewal carries no invite", code="malformed")
        certificate = MembershipCertificate.from_bytes(presented)
        if request.network_id not in (None, certificate.network_id):
            raise FederationError(
                "the renewal names another network than its membership", code="wrong_network"
            )
        network = self._hosted(certificate.network_id)
        check_member(certificate, link.certificate, network.description, now)  # forged, lapsed, another's
        account_id = link.certificate.account_id
        revocations = network.revocations
        if revocations is not None and revocations.is_revoked(certificate.member_account_public_key):
            raise MembershipError(f"account {account_id[:12]} was revoked", code="membership_revoked")
        book = await self._book()
        kept = await book.membership(network.network_id, account_id)
        if kept is None:
            raise MembershipError(
                f"account {account_id[:12]} is not in the books of {network.name}: join again",
                code="membership_unknown",
            )
        if kept.revoked_at is not None:
            raise MembershipError(f"account {account_id[:12]} was revoked", code="membership_revoked")
        serial = max(certificate.serial, MembershipCertificate.from_bytes(kept.certificate).serial) + 1
        issue = self._issuer(network, certificate.member_account_public_key, kept.role, now, serial)
        renewed = await book.renew(network.network_id, account_id, now, issue)  # refuses a revoked member
        return _joined(network, renewed.certificate)

    def _hosted(self, network_id: str) -> HeldNetwork:
        network = self._held.get(network_id)
        if network is None or not network.hosted:
            raise MembershipError(f"this node hosts no network {network_id[:16]}", code="unknown_network")
        return network

    def _redirect(self, network_id: str | None) -> HeldNetwork | None:
        """A public network this node joined (not hosts) that the joiner may ask its authority for."""
        if network_id is None and any(
            network.hosted and network.description.default for network in self._held.networks()
        ):
            return None
        for network in self._held.networks():
            wanted = network_id is None or network.network_id == network_id
            if (
                wanted
                and not network.hosted
                and network.description.visibility == "public"
                and network.description.bootstrap
            ):
                return network
        return None

    def _public(self, network_id: str | None) -> HeldNetwork:
        if network_id is None:
            hosted = [network for network in self._held.networks() if network.hosted]
            network = next((item for item in hosted if item.description.default), None)
            if network is None:
                raise MembershipError("this node hosts no default network", code="unknown_network")
        else:
            network = self._hosted(network_id)
        if network.description.visibility != "public":
            raise MembershipError(
                f"network {network.name} is private: joining it takes an invite", code="invite_required"
            )
        return network

    def _issuer(
        self, network: HeldNetwork, account_key: bytes, role: str, now: float, serial: int = 0
    ) -> Callable[[], tuple[bytes, float]]:
        key = authority_key(self._identity)

        def issue() -> tuple[bytes, float]:
            certificate = issue_membership(
                key,
                network.description,
                account_key,
                role=role,  # type: ignore[arg-type]
                serial=serial,
                now=now,
            )
            return certificate.to_bytes(), float(certificate.expires_at)

        return issue


def _joined(network: HeldNetwork, membership: bytes) -> JoinedMessage:
    revocations = network.revocations
    return JoinedMessage(
        description=network.description.to_bytes(),
        membership=membership,
        revocations=None if revocations is None else revocations.to_bytes(),
    )


async def _exchange(
    endpoint: QuicEndpoint, address: str, request: JoinRequestMessage, timeout_s: float, what: str
) -> JoinedMessage:
    """Send ``request`` on a fresh link to ``address``; its ``joined`` answer (errors raise)."""
    host, port = split_address(address)
    link = await endpoint.connect(host, port, timeout_s)
    try:
        stream = link.open_stream()
        stream.send(request)
        reply = await stream.receive(timeout_s)
    finally:
        link.close(f"{what} done")
    if isinstance(reply, ErrorMessage):
        error_type = MembershipError if reply.code == "join_refused" else FederationError
        raise error_type(f"{address} refused the {what}: {reply.message}")
    if not isinstance(reply, JoinedMessage):
        raise PeerError(f"{address} answered a {what} with {type(reply).__name__}")
    return reply


def _admission(reply: JoinedMessage, description: NetworkDescription) -> Admission:
    membership = MembershipCertificate.from_bytes(reply.membership)
    membership.verify(description)
    revocations = None if reply.revocations is None else MemberRevocationList.from_bytes(reply.revocations)
    if revocations is not None:
        revocations.verify(description)
    return description, membership, revocations


async def request_join(
    endpoint: QuicEndpoint,
    address: str,
    *,
    invite: InviteToken | None = None,
    network_id: str | None = None,
    timeout_s: float = JOIN_TIMEOUT_S,
) -> Admission:
    """Ask the bootstrap at ``address`` to admit this node's account (with ``invite``, or to a public
    network); the verified description, membership and member revocations. Raises MembershipError
    or FederationError with the authority's reason, PeerError if it cannot be reached."""
    request = JoinRequestMessage(invite=None if invite is None else invite.to_bytes(), network_id=network_id)
    reply = await _exchange(endpoint, address, request, timeout_s, "join")
    description = NetworkDescription.from_bytes(reply.description)
    description.verify()
    if not reply.membership and invite is None and network_id is None:
        # A member of a public network pointed at its authority: ask there, once.
        for bootstrap in description.bootstrap:
            if bootstrap != address:
                return await request_join(
                    endpoint, bootstrap, network_id=description.network_id, timeout_s=timeout_s
                )
        raise MembershipError(f"{address} names no other bootstrap of network {description.name}")
    if invite is not None:
        invite.check_for(description)
    elif network_id is not None and description.network_id != network_id:
        raise FederationError(f"{address} answered for another network", code="wrong_network")
    return _admission(reply, description)


async def request_renewal(
    endpoint: QuicEndpoint, address: str, network: HeldNetwork, *, timeout_s: float = JOIN_TIMEOUT_S
) -> Admission:
    """Ask the authority at ``address`` to renew this node's membership of ``network``, presenting the
    one held; the verified description, renewed membership and member revocations. Raises
    MembershipError or FederationError with the authority's reason, PeerError if it cannot be reached."""
    request = JoinRequestMessage(network_id=network.network_id, membership=network.membership.to_bytes())
    reply = await _exchange(endpoint, address, request, timeout_s, "renewal")
    description = NetworkDescription.from_bytes(reply.description)
    description.verify()
    if (
        description.network_id != network.network_id
        or description.authority_public_key != network.description.authority_public_key
    ):
        raise FederationError(f"{address} answered for another network", code="wrong_network")
    return _admission(reply, description)


class Joins:
    """A node's joins, both ways: it admits joiners to the networks it hosts, and joins networks itself."""

    def __init__(
        self, settings: NodeSettings, identity: NodeIdentity, endpoint: QuicEndpoint, networks: NetworkLinks
    ) -> None:
        self._settings = settings
        self._endpoint = endpoint
        self._networks = networks
        self._store: Store | None = None
        self._admissions = Admissions(identity, networks.held, self._book)
        self.renewals = Renewals(
            networks, lambda address, network: request_renewal(endpoint, address, network)
        )

    async def answer(self, link: PeerLink, stream: FrameStream, request: JoinRequestMessage) -> None:
        await self._admissions.answer(link, stream, request)

    async def _book(self) -> MembershipBook:
        # Opened on the first join: a node that hosts nothing never opens it.
        if self._store is None:
            self._store = await Store.open(self._settings.resolved_database_url)
        return MembershipBook(self._store.engine)

    async def close(self) -> None:
        await self.renewals.close()
        if self._store is not None:
            await self._store.close()
            self._store = None

    async def join(self, address: str, invite: InviteToken | None, network_id: str | None) -> HeldNetwork:
        """Join at ``address`` (with ``invite``, or a public network) and keep the membership."""
        description, membership, revocations = await request_join(
            self._endpoint, address, invite=invite, network_id=network_id
        )
        network = self._networks.held.store_joined(description, membership, revocations)
        await self._networks.load()
        logger.info("joined network %s (%s) at %s", network.name, network.network_id[:16], address)
        return network

    async def join_configured(self) -> None:
        """Redeem the configured invite (``join``) at its bootstrap, unless this node is a member already."""
        if not self._settings.join:
            return
        token = InviteToken.from_text(self._settings.join)
        if self._networks.held.get(token.network_id) is not None:
            return
        for address in token.bootstrap:
            try:
                await self.join(address, token, None)
                return
            except (PeerError, OSError) as error:
                logger.warning("could not reach %s to join: %s", address, error)
        raise PeerError(f"no bootstrap of the invite could be reached: {', '.join(token.bootstrap)}")
