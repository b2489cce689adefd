"""Network descriptions: what a network's authority signs about it, and the book of the newest per network."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Annotated, Literal

import cbor2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mycellm.config import PriceSettings, Tier
from mycellm.errors import FederationError
from mycellm.federation.network_ids import NetworkIdText, NetworkName, network_id_for
from mycellm.federation.signed import (
    BootstrapAddresses,
    Signature,
    Timestamp,
    build_signed,
    check_signature,
    decode_book,
    parse_signed,
    whole_seconds,
)
from mycellm.identity.canonical import CanonicalModel, describe_validation_error
from mycellm.identity.certificates import RawPublicKey, raw_public_key
from mycellm.types import NetworkId

DESCRIPTION_VERSION = 1

DESCRIPTION_MAX_BYTES = 65536

MAX_MODEL_TIERS = 256

DESCRIPTION_BOOK_MAX_NETWORKS = 256

DESCRIPTION_BOOK_MAX_BYTES = 16 * 1024 * 1024

# One credit in micro-credits, the ledger's unit (mycellm.ledger.pricing.MICRO): prices are signed
# as whole numbers of it so that the signed value has one exact encoding.
CREDIT_MICRO = 1_000_000

PARTS_PER_MILLION = 1_000_000

Visibility = Literal["public", "private"]

MicroCredits = Annotated[int, Field(ge=0, le=10**15)]

ModelName = Annotated[str, Field(min_length=1, max_length=128)]


class NetworkPrices(BaseModel):
    """A network's price table, in whole micro-credits and parts per million (exact in CBOR)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    tier_prices_micro: dict[Tier, MicroCredits]  # micro-credits per 1,000 completion tokens
    unknown_tier_price_micro: MicroCredits
    prompt_weight_ppm: Annotated[int, Field(ge=0, le=PARTS_PER_MILLION)]
    relay_fee_ppm: Annotated[int, Field(ge=0, lt=PARTS_PER_MILLION // 2)]
    initial_grant_micro: MicroCredits

    @classmethod
    def from_settings(cls, settings: PriceSettings) -> NetworkPrices:
        """The exact form of a config price table (rounded to the micro-credit and the ppm).

        Per-model prices have no signed form (a network prices by tier, see ``model_tiers``).
        """
        fields = {
            "tier_prices_micro": {
                tier: round(price * CREDIT_MICRO) for tier, price in settings.tier_prices.items()
            },
            "unknown_tier_price_micro": round(settings.unknown_tier_price * CREDIT_MICRO),
            "prompt_weight_ppm": round(settings.prompt_weight * PARTS_PER_MILLION),
            "relay_fee_ppm": round(settings.relay_fee * PARTS_PER_MILLION),
            "initial_grant_micro": round(settings.initial_grant * CREDIT_MICRO),
        }
        try:
            return cls.model_validate(fields)
        except ValidationError as error:
            raise FederationError(
                f"price table has no signed form: {describe_validation_error(error)}", code="malformed"
            ) from error

    def to_settings(self, base: PriceSettings | None = None) -> PriceSettings:
        """A config price table with these prices (the rest of ``base`` kept, its model prices dropped)."""
        base = base or PriceSettings()
        return base.model_copy(
            update={
                "tier_prices": {tier: micro / CREDIT_MICRO for tier, micro in self.tier_prices_micro.items()},
                "unknown_tier_price": self.unknown_tier_price_micro / CREDIT_MICRO,
                "model_prices": {},
                "prompt_weight": self.prompt_weight_ppm / PARTS_PER_MILLION,
                "relay_fee": self.relay_fee_ppm / PARTS_PER_MILLION,
                "initial_grant": self.initial_grant_micro / CREDIT_MICRO,
            }
        )


class JoinPolicy(BaseModel):
    """How many joins a network admits from one source address (public: auto-approved ones)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    max_joins_per_address_per_hour: Annotated[int, Field(ge=1, le=1_000_000)] = 5
    max_joins_per_address_per_day: Annotated[int, Field(ge=1, le=1_000_000)] = 20

    @model_validator(mode="after")
    def _day_covers_hour(self) -> JoinPolicy:
        if self.max_joins_per_address_per_day < self.max_joins_per_address_per_hour:
            raise ValueError("a day's join limit must not be below an hour's")
        return self


class NetworkDescription(CanonicalModel):
    """The authority's signed, numbered statement of what its network is and how it prices and admits."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    version: int = DESCRIPTION_VERSION
    network_id: NetworkIdText
    name: NetworkName
    default: bool  # the account's default network: id sha256(key), the name only a label
    visibility: Visibility
    authority_public_key: RawPublicKey
    bootstrap: BootstrapAddresses
    prices: NetworkPrices
    model_tiers: Annotated[dict[ModelName, Tier], Field(max_length=MAX_MODEL_TIERS)]
    join_policy: JoinPolicy
    serial: Annotated[int, Field(ge=0, lt=2**63)]
    issued_at: Timestamp
    signature: Signature

    @classmethod
    def from_bytes(cls, data: bytes) -> NetworkDescription:
        """Parse a description; checks the size cap before decoding. Does not verify the signature."""
        return parse_signed(
            cls,
            data,
            what="network description",
            max_bytes=DESCRIPTION_MAX_BYTES,
            version=DESCRIPTION_VERSION,
            tuples=("bootstrap",),
        )

    def verify(self) -> None:
        """Check the authority's signature and that the network id derives from its key (and name)."""
        check_signature(self, self.authority_public_key, what="network description")
        expected = network_id_for(self.authority_public_key, None if self.default else self.name)
        if self.network_id != expected:
            raise FederationError(
                f"network description names network {self.network_id}, but its authority key and"
                f" name give {expected}",
                code="wrong_network",
            )

    @property
    def id(self) -> NetworkId:
        return NetworkId(self.network_id)


def issue_network_description(
    account_key: Ed25519PrivateKey,
    *,
    name: str,
    default: bool = True,
    visibility: Visibility = "private",
    bootstrap: Iterable[str] = (),
    prices: NetworkPrices | None = None,
    model_tiers: Mapping[str, Tier] | None = None,
    join_policy: JoinPolicy | None = None,
    serial: int = 0,
    now: float | None = None,
) -> NetworkDescription:
    """Sign the description of ``account_key``'s default network or of its network called ``name``."""
    public_key = raw_public_key(account_key)
    fields = {
        "version": DESCRIPTION_VERSION,
        "network_id": network_id_for(public_key, None if default else name),
        "name": name,
        "default": default,
        "visibility": visibility,
        "authority_public_key": public_key,
        "bootstrap": tuple(bootstrap),
        "prices": prices or NetworkPrices.from_settings(PriceSettings()),
        "model_tiers": dict(model_tiers or {}),
        "join_policy": join_policy or JoinPolicy(),
        "serial": serial,
        "issued_at": whole_seconds(now),
    }
    return build_signed(
        NetworkDescription, account_key, fields, what="network description", max_bytes=DESCRIPTION_MAX_BYTES
    )


class DescriptionBook:
    """The newest verified description of each network a node knows (bounded; persisted by the caller)."""

    def __init__(
        self,
        descriptions: Iterable[NetworkDescription] = (),
        *,
        max_networks: int = DESCRIPTION_BOOK_MAX_NETWORKS,
    ) -> None:
        self.max_networks = max_networks
        self._descriptions: dict[str, NetworkDescription] = {}
        for description in descriptions:
            self.accept(description)

    def accept(self, description: NetworkDescription) -> bool:
        """Store a verified description if newer than the one held; True if stored.

        An older serial, or the very description already held, is not stored (False). The same
        serial with other contents is a FederationError (``conflict``): the authority signed two
        versions under one number. A new network beyond ``max_networks`` is refused (``full``).
        """
        description.verify()
        held = self._descriptions.get(description.network_id)
        if held is None:
            if len(self._descriptions) >= self.max_networks:
                raise FederationError(
                    f"description book holds {self.max_networks} networks already", code="full"
                )
        elif description.serial == held.serial:
            if description.to_bytes() != held.to_bytes():
                raise FederationError(
                    f"two different descriptions of network {description.network_id} with serial"
                    f" {description.serial}",
                    code="conflict",
                )
            return False
        elif description.serial < held.serial:
            return False
        self._descriptions[description.network_id] = description
        return True

    def get(self, network_id: str) -> NetworkDescription | None:
        return self._descriptions.get(network_id)

    def descriptions(self) -> list[NetworkDescription]:
        """The descriptions held, one per network, ordered by network id."""
        return [self._descriptions[network_id] for network_id in sorted(self._descriptions)]

    def to_bytes(self) -> bytes:
        """A canonical CBOR array of each description's own encoding."""
        return cbor2.dumps([description.to_bytes() for description in self.descriptions()], canonical=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> DescriptionBook:
        """Parse and re-verify a book; checks the size cap before decoding; raises FederationError."""
        decoded = decode_book("description book", data, DESCRIPTION_BOOK_MAX_BYTES)
        book = cls()
        for index, item in enumerate(decoded):
            try:
                description = NetworkDescription.from_bytes(item)
                if book.get(description.network_id) is not None:
                    raise FederationError(
                        f"a second description of network {description.network_id}", code="malformed"
                    )
                book.accept(description)
            except FederationError as error:
                raise FederationError(
                    f"description book entry {index}: {error.message}", code=error.code
                ) from error
        return book
