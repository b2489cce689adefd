"""The networks a node belongs to: each one's description, the node's membership, and its member revocations.

Two kinds, one view. A network this node's account hosts lives under ``networks/<id>/`` (written by
``mycellm network create|revoke``); the node holds the account key, so it signs its own membership
(role ``admin``) in memory and renews it as it nears expiry. A network this node joined lives under
``memberships/<id>/``: the description, membership certificate and member revocations the authority
sent, as signed bytes, re-verified at every load. ``refresh`` reads both again (the CLI changes them
while the node runs) and returns what is new, so the node can pass it on to its peers.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from mycellm.config import NodeSettings
from mycellm.errors import FederationError, IdentityError
from mycellm.federation.authority import (
    DESCRIPTION_FILE,
    MEMBER_REVOCATIONS_FILE,
    authority_key,
    create_network,
    hosted_networks,
    model_tiers_from,
    networks_directory,
)
from mycellm.federation.descriptions import DESCRIPTION_MAX_BYTES, NetworkDescription, NetworkPrices
from mycellm.federation.member_revocations import MEMBER_REVOCATIONS_MAX_BYTES, MemberRevocationList
from mycellm.federation.memberships import MEMBERSHIP_MAX_BYTES, MembershipCertificate, issue_membership
from mycellm.federation.network_ids import check_network_id
from mycellm.identity.certificates import raw_public_key
from mycellm.identity.files import read_private, replace_private
from mycellm.identity.keys import NodeIdentity
from mycellm.types import NetworkId

MEMBERSHIPS_DIR = "memberships"

MEMBERSHIP_FILE = "membership.cbor"

DEFAULT_NETWORK_NAME = "default"

# A self-signed membership of a hosted network is signed again when less than this is left.
RENEW_BEFORE_S = 86400.0

# A joined network's membership is renewed by its authority (over the wire) once less than this
# share of its validity is left: 10 days before the end of a 30-day certificate, so an authority
# that is away for a while (the member asks again, backing off) costs nobody their place.
RENEW_FRACTION = 1 / 3


def renewal_due(membership: MembershipCertificate, now: float) -> bool:
    """Whether a member should ask for a renewal now: valid, with less than a third of its span left.
    A lapsed membership is not renewed (its member joins again)."""
    left = membership.expires_at - now
    validity = membership.expires_at - membership.issued_at
    return membership.issued_at <= now and 0 < left < validity * RENEW_FRACTION


@dataclass(frozen=True, slots=True)
class HeldNetwork:
    """One network of this node: what its authority says it is, and the node's place in it."""

    description: NetworkDescription
    membership: MembershipCertificate
    revocations: MemberRevocationList | None
    hosted: bool

    @property
    def network_id(self) -> NetworkId:
        return NetworkId(self.description.network_id)

    @property
    def name(self) -> str:
        return self.description.name


@dataclass
class NetworkNews:
    """What ``refresh`` or ``accept_*`` found new: to be passed on to the peers of each network."""

    descriptions: list[NetworkDescription] = field(default_factory=list)
    revocations: list[MemberRevocationList] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.descriptions or self.revocations)


def _read_signed(path: Path, max_bytes: int) -> bytes | None:
    return read_private(path, max_bytes) if path.exists() else None


class HeldNetworks:
    """The networks of one node, by id; loaded from its data directory, kept there when they change."""

    def __init__(self, data_dir: Path, identity: NodeIdentity) -> None:
        self._data_dir = Path(data_dir)
        self._identity = identity
        self._networks: dict[NetworkId, HeldNetwork] = {}

    @property
    def joined_directory(self) -> Path:
        return self._data_dir / MEMBERSHIPS_DIR

    # -- loading ------------------------------------------------------------------------------

    def refresh(self, now: float | None = None) -> NetworkNews:
        """Read every network from disk again; what is newer than what was held comes back as news."""
        return self.adopt(self.read(now))

    def read(self, now: float | None = None) -> dict[NetworkId, HeldNetwork]:
        """Every network on disk, checked, without holding them yet (``adopt`` does)."""
        now = time.time() if now is None else now
        return {network.network_id: network for network in (*self._hosted(now), *self._joined(now))}

    def stamp(self) -> tuple[tuple[str, int], ...]:
        """When the networks' folders last changed: a network joined, left, renewed or re-described
        on disk (by the CLI, or by this node) changes it."""
        stamps = []
        for top in (networks_directory(self._data_dir), self.joined_directory):
            with contextlib.suppress(OSError):
                stamps.append((str(top), top.stat().st_mtime_ns))
                for folder in top.iterdir():
                    stamps.append((str(folder), folder.stat().st_mtime_ns))
        return tuple(sorted(stamps))

    def adopt(self, loaded: dict[NetworkId, HeldNetwork]) -> NetworkNews:
        """Hold ``loaded`` (what ``read`` gave) instead; what is newer than what was held is the news."""
        news = NetworkNews()
        for network_id, network in loaded.items():
            held = self._networks.get(network_id)
            if held is None or network.description.serial > held.description.serial:
                news.descriptions.append(network.description)
            if network.revocations is not None and (
                held is None
                or held.revocations is None
                or network.revocations.serial > held.revocations.serial
            ):
                news.revocations.append(network.revocations)
        self._networks = loaded
        return news

    def _hosted(self, now: float) -> list[HeldNetwork]:
        hosted = hosted_networks(self._data_dir)
        if not hosted:
            return []
        try:
            key = authority_key(self._identity)
        except IdentityError:
            return []  # another device of the account: it joins the account's networks like anyone
        held = []
        for network in hosted:
            if raw_public_key(key) != network.description.authority_public_key:
                continue
            previous = self._networks.get(NetworkId(network.network_id))
            membership = previous.membership if previous is not None and previous.hosted else None
            if membership is None or membership.expires_at - now < RENEW_BEFORE_S:
                membership = issue_membership(
                    key, network.description, raw_public_key(key), role="admin", now=now
                )
            held.append(HeldNetwork(network.description, membership, network.revocations, hosted=True))
        return held

    def _joined(self, now: float) -> list[HeldNetwork]:
        root = self.joined_directory
        if not root.is_dir():
            return []
        held = []
        for directory in sorted(path for path in root.iterdir() if path.is_dir()):
            with contextlib.suppress(ValueError):
                check_network_id(directory.name)
                held.append(self._read_joined(directory, now))
        return held

    def _read_joined(self, directory: Path, now: float) -> HeldNetwork:
        try:
            description = NetworkDescription.from_bytes(
                read_private(directory / DESCRIPTION_FILE, DESCRIPTION_MAX_BYTES)
            )
            membership = MembershipCertificate.from_bytes(
                read_private(directory / MEMBERSHIP_FILE, MEMBERSHIP_MAX_BYTES)
            )
            data = _read_signed(directory / MEMBER_REVOCATIONS_FILE, MEMBER_REVOCATIONS_MAX_BYTES)
            revocations = None if data is None else MemberRevocationList.from_bytes(data)
            return self._checked(description, membership, revocations, directory.name)
        except FederationError as error:
            raise FederationError(f"{directory}: {error.message}", code=error.code) from error

    def _checked(
        self,
        description: NetworkDescription,
        membership: MembershipCertificate,
        revocations: MemberRevocationList | None,
        network_id: str,
    ) -> HeldNetwork:
        description.verify()
        if description.network_id != network_id:
            raise FederationError(
                f"the description is of network {description.network_id}", code="wrong_network"
            )
        # Validity is checked at each link; a lapsed membership is kept so it can be renewed.
        membership.verify(description, now=membership.issued_at)
        if membership.member_account_public_key != self._identity.certificate.account_public_key:
            raise FederationError("the membership is another account's", code="wrong_member")
        if revocations is not None:
            revocations.verify(description)
        return HeldNetwork(description, membership, revocations, hosted=False)

    # -- views --------------------------------------------------------------------------------

    def networks(self) -> list[HeldNetwork]:
        """Every network held, ordered by name then id."""
        return sorted(self._networks.values(), key=lambda network: (network.name, network.network_id))

    def ids(self) -> frozenset[NetworkId]:
        return frozenset(self._networks)

    def get(self, network_id: str) -> HeldNetwork | None:
        return self._networks.get(NetworkId(network_id))

    def __len__(self) -> int:
        return len(self._networks)

    def find(self, name_or_id: str) -> HeldNetwork:
        """The network called ``name_or_id``, or whose id starts with it (8+ characters)."""
        networks = self.networks()
        matching = [network for network in networks if network.name == name_or_id]
        if len(matching) != 1 and len(name_or_id) >= 8:
            matching = [network for network in networks if network.network_id.startswith(name_or_id.lower())]
        if len(matching) == 1:
            return matching[0]
        known = ", ".join(f"{network.name} ({network.network_id[:12]})" for network in networks) or "none"
        raise FederationError(
            f"this node is in no single network called {name_or_id!r} (its networks: {known})",
            code="unknown_network",
        )

    def default(self, preferred: str | None = None) -> HeldNetwork | None:
        """The network a request without a choice runs in: ``preferred``, else a joined network (a node
        configured to join one serves it), else the account's default network, else the first."""
        if preferred:
            return self.find(preferred)
        networks = self.networks()
        for network in networks:
            if not network.hosted:
                return network
        return next((network for network in networks if network.description.default), None) or next(
            iter(networks), None
        )

    # -- changes ------------------------------------------------------------------------------

    def store_joined(
        self,
        description: NetworkDescription,
        membership: MembershipCertificate,
        revocations: MemberRevocationList | None,
    ) -> HeldNetwork:
        """Keep a network this node was admitted to (checked first: nothing is written if it fails)."""
        network = self._checked(description, membership, revocations, description.network_id)
        directory = self.joined_directory / description.network_id
        _make_private_directory(directory)
        replace_private(directory / DESCRIPTION_FILE, description.to_bytes())
        replace_private(directory / MEMBERSHIP_FILE, membership.to_bytes())
        if revocations is not None:
            replace_private(directory / MEMBER_REVOCATIONS_FILE, revocations.to_bytes())
        self._networks[network.network_id] = network
        return network

    def leave(self, network_id: str) -> bool:
        """Forget a joined network (its files too); False if this node was not in it."""
        network = self._networks.get(NetworkId(network_id))
        directory = self.joined_directory / network_id
        if network is not None and network.hosted:
            raise FederationError("this node hosts that network: it cannot leave it", code="conflict")
        self._networks.pop(NetworkId(network_id), None)
        if not directory.is_dir():
            return network is not None
        shutil.rmtree(directory)
        return True

    def accept_description(self, description: NetworkDescription) -> bool:
        """Replace a joined network's description by a newer one its authority signed; True if it was."""
        held = self._networks.get(NetworkId(description.network_id))
        if held is None or held.hosted or description.serial <= held.description.serial:
            return False
        description.verify()
        if description.authority_public_key != held.description.authority_public_key:
            raise FederationError("a description signed by another authority", code="bad_signature")
        replace_private(
            self.joined_directory / description.network_id / DESCRIPTION_FILE, description.to_bytes()
        )
        self._networks[held.network_id] = HeldNetwork(description, held.membership, held.revocations, False)
        return True

    def accept_membership(self, membership: MembershipCertificate, now: float | None = None) -> HeldNetwork:
        """Keep a renewed membership of a joined network: its authority's, this account's, valid now and
        newer than the one held (FederationError, and nothing written, if not). One atomic file swap."""
        held = self._networks.get(NetworkId(membership.network_id))
        if held is None or held.hosted:
            raise FederationError(
                f"this node joined no network {membership.network_id[:16]}", code="unknown_network"
            )
        membership.verify(held.description, now=now)
        if membership.member_account_public_key != self._identity.certificate.account_public_key:
            raise FederationError("the membership is another account's", code="wrong_member")
        if membership.serial <= held.membership.serial or membership.expires_at < held.membership.expires_at:
            raise FederationError(
                f"membership serial {membership.serial} (until {membership.expires_at}) is not newer than"
                f" serial {held.membership.serial} (until {held.membership.expires_at})",
                code="conflict",
            )
        replace_private(
            self.joined_directory / membership.network_id / MEMBERSHIP_FILE, membership.to_bytes()
        )
        network = HeldNetwork(held.description, membership, held.revocations, hosted=False)
        self._networks[held.network_id] = network
        return network

    def accept_revocations(self, revocations: MemberRevocationList) -> bool:
        """Keep a newer member revocation list of a held network; True if it was newer."""
        held = self._networks.get(NetworkId(revocations.network_id))
        if held is None or (held.revocations is not None and revocations.serial <= held.revocations.serial):
            return False
        revocations.verify(held.description)
        if not held.hosted:  # a hosted network's list is the authority's own file
            replace_private(
                self.joined_directory / revocations.network_id / MEMBER_REVOCATIONS_FILE,
                revocations.to_bytes(),
            )
        self._networks[held.network_id] = HeldNetwork(
            held.description, held.membership, revocations, held.hosted
        )
        return True


def _make_private_directory(directory: Path) -> None:
    try:
        directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.mkdir(mode=0o700, exist_ok=True)
    except OSError as error:
        raise IdentityError(f"cannot create {directory}: {error}") from error


def create_default_network(
    settings: NodeSettings, identity: NodeIdentity, now: float | None = None
) -> HeldNetwork | None:
    """The account's default network, created public on a node that is in no network, is told to join
    none, and holds the account key (a bare ``mycellm serve``); None when it is not created."""
    held = HeldNetworks(settings.resolved_data_dir, identity)
    held.refresh(now)
    if len(held) or settings.join or settings.bootstrap_peers or identity.account_key is None:
        return None
    create_network(
        settings.resolved_data_dir,
        identity,
        name=DEFAULT_NETWORK_NAME,
        visibility="public",
        default=True,
        bootstrap=[settings.resolved_advertise_address] if settings.resolved_advertise_address else [],
        prices=NetworkPrices.from_settings(settings.credits),
        model_tiers=model_tiers_from(settings),
        now=now,
    )
    held.refresh(now)
    return held.default()
