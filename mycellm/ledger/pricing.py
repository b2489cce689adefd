"""What a request costs: a price table by model tier, the relay fee, the grant for a new member,
and the policy on peers that only consume.

Amounts are whole micro-credits (1 credit = 1,000,000) so that every sum is exact.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

MICRO = 1_000_000

# Credits per 1,000 tokens by tier; prompt tokens cost a quarter of completion tokens (they are
# processed in parallel, completion tokens one at a time).
DEFAULT_TIER_PRICES: dict[str, float] = {"tiny": 0.02, "fast": 0.1, "capable": 0.5, "frontier": 2.0}


class PriceSettings(BaseModel):
    """The price table in config (``credits:`` section); every node of a network must agree on it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tier_prices: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_TIER_PRICES))
    unknown_tier_price: float = Field(default=0.1, ge=0)
    model_prices: dict[str, float] = Field(default_factory=dict)  # per-model override, credits / 1k tokens
    prompt_weight: float = Field(default=0.25, ge=0, le=1)
    relay_fee: float = Field(default=0.10, ge=0, lt=0.5)
    initial_grant: float = Field(default=100.0, ge=0)
    # Reputation and the freeloader policy: a peer that has consumed more than grace_credits from
    # this node, and more than max_consume_ratio times what it served this node, is refused.
    reputation_half_life_s: float = Field(default=7 * 86400, gt=0)
    grace_credits: float = Field(default=10.0, ge=0)
    max_consume_ratio: float = Field(default=4.0, gt=0)


class PriceTable:
    def __init__(self, settings: PriceSettings | None = None) -> None:
        self.settings = settings or PriceSettings()

    @property
    def initial_grant(self) -> int:
        return round(self.settings.initial_grant * MICRO)

    def rate(self, model: str, tier: str | None) -> float:
        """Credits per 1,000 completion tokens for ``model``."""
        if model in self.settings.model_prices:
            return self.settings.model_prices[model]
        return self.settings.tier_prices.get(tier or "", self.settings.unknown_tier_price)

    def price(self, model: str, tier: str | None, prompt_tokens: int, completion_tokens: int) -> int:
        """Micro-credits for one request (rounded up: a served token is never free)."""
        weighted = completion_tokens + self.settings.prompt_weight * prompt_tokens
        micro = self.rate(model, tier) * MICRO * weighted / 1000
        return int(-(-micro // 1))

    def split(self, price: int, relays: int) -> tuple[int, list[int]]:
        """The seeder's share and each relay's fee; they add up to ``price`` exactly."""
        fee = int(price * self.settings.relay_fee)
        fees = [fee] * relays
        return price - sum(fees), fees


def credits(micro: int | Sequence[int]) -> float:
    """Micro-credits as credits, for display."""
    total = micro if isinstance(micro, int) else sum(micro)
    return total / MICRO
