"""What a request costs: a price table by model tier, the relay fee, the grant for a new member,
and the policy on peers that only consume.

Amounts are whole micro-credits (1 credit = 1,000,000) so that every sum is exact.
"""

from __future__ import annotations

from collections.abc import Sequence

from mycellm.config import PriceSettings

MICRO = 1_000_000


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
