"""The networks this node's account hosts, kept in its data directory as signed descriptions and member revocations."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mycellm.config import NodeSettings, Tier
from mycellm.engines.names import configured_names, model_tier_for
from mycellm.errors import FederationError, IdentityError
from mycellm.federation.descriptions import (
    DESCRIPTION_MAX_BYTES,
    JoinPolicy,
    NetworkDescription,
    NetworkPrices,
    Visibility,
    issue_network_description,
)
from mycellm.federation.invites import DEFAULT_INVITE_VALIDITY_S, InviteToken, issue_invite
from mycellm.federation.member_revocations import (
    MEMBER_REVOCATIONS_MAX_BYTES,
    MemberRevocationList,
    issue_member_revocations,
)
from mycellm.federation.network_ids import check_network_id
from mycellm.federation.signed import MemberRole
from mycellm.identity.certificates import raw_public_key
from mycellm.identity.files import read_private, replace_private
from mycellm.identity.keys import NodeIdentity

NETWORKS_DIR = "networks"

DESCRIPTION_FILE = "description.cbor"

MEMBER_REVOCATIONS_FILE = "member-revocations.cbor"

# A network id prefix must be long enough that a typo does not pick another network.
MIN_ID_PREFIX_CHARS = 8


class UnknownNetworkError(FederationError):
    """No hosted network goes by that name or id prefix, or more than one does."""

    status = 404
    error_type = "not_found_error"


@dataclass(frozen=True, slots=True)
class HostedNetwork:
    """A network this node's account hosts: its newest description and member revocations, and where they live."""

    description: NetworkDescription
    revocations: MemberRevocationList | None
    directory: Path

    @property
    def network_id(self) -> str:
        return self.description.network_id

    @property
    def name(self) -> str:
        return self.description.name


_DURATION = re.compile(r"([1-9][0-9]{0,9})([smhd])")

_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}

# An invite is an offer for hours or days: a typo such as 7000d is refused rather than signed.
MAX_INVITE_VALIDITY_S = 365 * 86400


def parse_duration(text: str) -> int:
    """Seconds in a duration such as ``30m``, ``24h`` or ``7d``; ValueError if it is not one."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"duration {text[:40]!r} is not a whole number followed by s, m, h or d (24h, 7d)")
    seconds = int(match.group(1)) * _UNIT_S[match.group(2)]
    if seconds > MAX_INVITE_VALIDITY_S:
        raise ValueError(f"duration {text!r} is over a year")
    return seconds


def network_summary(network: HostedNetwork) -> dict[str, Any]:
    """A hosted network as plain JSON values: its description's fields and its revocation list's serial."""
    description = network.description
    revocations = network.revocations
    return {
        "network_id": description.network_id,
        "name": description.name,
        "default": description.default,
        "visibility": description.visibility,
        "serial": description.serial,
        "issued_at": description.issued_at,
        "authority_public_key": description.authority_public_key.hex(),
        "bootstrap": list(description.bootstrap),
        "prices": description.prices.model_dump(),
        "model_tiers": dict(description.model_tiers),
        "join_policy": description.join_policy.model_dump(),
        "member_revocations": None
        if revocations is None
        else {"serial": revocations.serial, "revoked": len(revocations.revoked)},
    }


def networks_directory(data_dir: Path) -> Path:
    return Path(data_dir) / NETWORKS_DIR


def authority_key(identity: NodeIdentity) -> Ed25519PrivateKey:
    """The account key a network authority signs with; IdentityError on a node that lacks it."""
    if identity.account_key is None:
        raise IdentityError(
            f"this node holds no account key (identity/account.key) for account {identity.account_id[:16]}:"
            " only the node that holds the account key can host networks and sign for them"
        )
    return identity.account_key


def model_tiers_from(settings: NodeSettings) -> dict[str, Tier]:
    """The tiers the node's config gives the models it serves, under the names they are served by
    (the bundled model: ``tiny`` unless configured); entries without a tier are left out, and the
    first entry of a name fixes its tier (one tier per model name in a network)."""
    tiers: dict[str, Tier] = {}
    for entry in settings.models:
        tier = model_tier_for(entry)
        if tier is None:
            continue
        for name in configured_names(entry):
            tiers.setdefault(name, tier)
    return tiers


def _replace_private(path: Path, data: bytes) -> None:
    try:
        # The networks folder and each network's folder: 0700, like the identity folder.
        path.parent.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.parent.mkdir(mode=0o700, exist_ok=True)
    except OSError as error:
        raise IdentityError(f"cannot create {path.parent}: {error}") from error
    replace_private(path, data)


def _read_description(directory: Path) -> NetworkDescription:
    path = directory / DESCRIPTION_FILE
    data = read_private(path, DESCRIPTION_MAX_BYTES)
    try:
        description = NetworkDescription.from_bytes(data)
        description.verify()
    except FederationError as error:
        raise FederationError(f"{path}: {error.message}", code=error.code) from error
    if description.network_id != directory.name:
        raise FederationError(
            f"{path} describes network {description.network_id}, not {directory.name}", code="wrong_network"
        )
    return description


def _read_revocations(directory: Path, description: NetworkDescription) -> MemberRevocationList | None:
    path = directory / MEMBER_REVOCATIONS_FILE
    if not path.exists():
        return None
    data = read_private(path, MEMBER_REVOCATIONS_MAX_BYTES)
    try:
        revocations = MemberRevocationList.from_bytes(data)
        revocations.verify(description)
    except FederationError as error:
        raise FederationError(f"{path}: {error.message}", code=error.code) from error
    return revocations


def hosted_networks(data_dir: Path) -> list[HostedNetwork]:
    """Every network kept under ``data_dir/networks``, each verified, ordered by name then id."""
    root = networks_directory(data_dir)
    try:
        directories = sorted(path for path in root.iterdir() if path.is_dir()) if root.is_dir() else []
    except OSError as error:
        raise IdentityError(f"cannot look into {root}: {error}") from error
    networks = []
    for directory in directories:
        try:
            check_network_id(directory.name)
        except ValueError:
            continue  # not a network's directory (a staging file, an editor's leftover)
        description = _read_description(directory)
        networks.append(HostedNetwork(description, _read_revocations(directory, description), directory))
    return sorted(networks, key=lambda network: (network.name, network.network_id))


def load_network(data_dir: Path, name_or_id_prefix: str) -> HostedNetwork:
    """The hosted network called ``name_or_id_prefix``, or else the one whose id starts with it."""
    networks = hosted_networks(data_dir)
    named = [network for network in networks if network.name == name_or_id_prefix]
    if len(named) == 1:
        return named[0]
    prefix = name_or_id_prefix.lower()
    matching = (
        [network for network in networks if network.network_id.startswith(prefix)]
        if len(prefix) >= MIN_ID_PREFIX_CHARS
        else []
    )
    if len(matching) == 1:
        return matching[0]
    if matching:
        raise UnknownNetworkError(
            f"{len(matching)} hosted networks have ids starting with {name_or_id_prefix!r}: give more of the id",
            code="ambiguous_network",
        )
    raise UnknownNetworkError(
        f"no hosted network is called {name_or_id_prefix!r} or has an id starting with it"
        f" (ids need {MIN_ID_PREFIX_CHARS}+ characters)",
        code="unknown_network",
    )


def create_network(
    data_dir: Path,
    identity: NodeIdentity,
    *,
    name: str,
    visibility: Visibility,
    default: bool,
    bootstrap: Iterable[str],
    prices: NetworkPrices,
    model_tiers: Mapping[str, Tier],
    join_policy: JoinPolicy | None = None,
    now: float | None = None,
) -> HostedNetwork:
    """Sign serial 0 of a new network of this account and keep it; FederationError ``conflict`` for a
    name this account already hosts, or a second default network."""
    key = authority_key(identity)
    existing = hosted_networks(data_dir)
    if any(network.name == name for network in existing):
        raise FederationError(f"this account already hosts a network called {name!r}", code="conflict")
    if default and any(network.description.default for network in existing):
        held = next(network for network in existing if network.description.default)
        raise FederationError(
            f"this account's default network exists already ({held.name}, {held.network_id[:16]})",
            code="conflict",
        )
    description = issue_network_description(
        key,
        name=name,
        default=default,
        visibility=visibility,
        bootstrap=bootstrap,
        prices=prices,
        model_tiers=model_tiers,
        join_policy=join_policy,
        serial=0,
        now=now,
    )
    directory = networks_directory(data_dir) / description.network_id
    if (directory / DESCRIPTION_FILE).exists():
        raise FederationError(f"network {description.network_id} is kept already", code="conflict")
    _replace_private(directory / DESCRIPTION_FILE, description.to_bytes())
    return HostedNetwork(description, None, directory)


def next_description(
    identity: NodeIdentity,
    network: HostedNetwork,
    *,
    visibility: Visibility | None = None,
    bootstrap: Iterable[str] | None = None,
    prices: NetworkPrices | None = None,
    model_tiers: Mapping[str, Tier] | None = None,
    join_policy: JoinPolicy | None = None,
    now: float | None = None,
) -> HostedNetwork:
    """Sign and keep the next serial of the description when something changes; else the network as it is."""
    key = _own_key(identity, network)
    held = network.description
    new_visibility = held.visibility if visibility is None else visibility
    new_bootstrap = held.bootstrap if bootstrap is None else tuple(bootstrap)
    new_prices = held.prices if prices is None else prices
    new_tiers = held.model_tiers if model_tiers is None else dict(model_tiers)
    new_policy = held.join_policy if join_policy is None else join_policy
    if (new_visibility, new_bootstrap, new_prices, new_tiers, new_policy) == (
        held.visibility,
        held.bootstrap,
        held.prices,
        held.model_tiers,
        held.join_policy,
    ):
        return network
    description = issue_network_description(
        key,
        name=held.name,
        default=held.default,
        visibility=new_visibility,
        bootstrap=new_bootstrap,
        prices=new_prices,
        model_tiers=new_tiers,
        join_policy=new_policy,
        serial=held.serial + 1,
        now=now,
    )
    _replace_private(network.directory / DESCRIPTION_FILE, description.to_bytes())
    return HostedNetwork(description, network.revocations, network.directory)


def _own_key(identity: NodeIdentity, network: HostedNetwork) -> Ed25519PrivateKey:
    key = authority_key(identity)
    if raw_public_key(key) != network.description.authority_public_key:
        raise FederationError(
            f"network {network.network_id[:16]} is hosted by another account than this node's",
            code="bad_signature",
        )
    return key


def invite(
    identity: NodeIdentity,
    network: HostedNetwork,
    *,
    role: MemberRole = "consumer",
    max_uses: int = 1,
    validity_s: int = DEFAULT_INVITE_VALIDITY_S,
    bind_key: bytes | None = None,
    now: float | None = None,
) -> InviteToken:
    """Sign an invite to ``network`` (the caller records it in the authority's books)."""
    return issue_invite(
        _own_key(identity, network),
        network.description,
        role=role,
        max_uses=max_uses,
        validity_s=validity_s,
        bind_key=bind_key,
        now=now,
    )


def revoke_member(
    identity: NodeIdentity, network: HostedNetwork, member_public_key: bytes, *, now: float | None = None
) -> HostedNetwork:
    """Sign and keep the next member revocation list with ``member_public_key`` in it (as it is if it is)."""
    key = _own_key(identity, network)
    held = network.revocations
    if held is not None and held.is_revoked(member_public_key):
        return network
    revocations = issue_member_revocations(
        key,
        network.description,
        [*(held.revoked if held is not None else ()), member_public_key],
        serial=1 if held is None else held.serial + 1,
        now=now,
    )
    _replace_private(network.directory / MEMBER_REVOCATIONS_FILE, revocations.to_bytes())
    return HostedNetwork(network.description, revocations, network.directory)
