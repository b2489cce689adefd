"""ApiKeyBook: the node's API keys (digests, never secrets), their limits and daily budgets, exact under concurrency.

A key is stored as its public id, a SHA-256 digest of its text (see ``mycellm.api.keys`` for why a
fast digest is the right hash here), its scopes, network and limits. Budgets are micro-credits per
UTC day: ``spent_micro`` counts the settled requests of ``day``, ``reserved_micro`` the worst-case
prices of requests still running. A reservation is one transaction: a row named by the request id
(a second reservation of the same request changes nothing) and one conditional
``UPDATE api_keys SET reserved = reserved + price WHERE spent_today + reserved + price <= budget``.
On PostgreSQL concurrent UPDATEs of one key queue on its row lock and each re-evaluates the
condition on the row the previous one committed; on SQLite the writers of a process queue on one
lock per engine and each transaction's first statement writes. So the budget is never exceeded by
reservations, and a refusal (402) rolls back and changes nothing. Settling deletes the reservation
and adds the actual price to the day's spending; a settled request settles only once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pydantic import Field
from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Double,
    Integer,
    LargeBinary,
    String,
    case,
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from mycellm.errors import AuthenticationError, BudgetExceededError, MycellmError
from mycellm.ledger.pricing import credits
from mycellm.ledger.store import INSERTS, StoreError
from mycellm.ledger.tables import Base
from mycellm.ledger.writes import Writes, rowcount
from mycellm.types import FrozenModel

DAY_S = 86400
DIGEST_BYTES = 32
MAX_KEYS = 10_000  # the ingress holds every key in memory: a bound, and the newcomer is refused

Answer = TypeVar("Answer")


class ApiKeyRow(Base):
    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint("spent_micro >= 0 AND reserved_micro >= 0", name="ck_api_keys_amounts"),
    )

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    digest: Mapped[bytes] = mapped_column(LargeBinary(DIGEST_BYTES))
    scopes: Mapped[str] = mapped_column(String(64))  # comma-separated, sorted
    network: Mapped[str | None] = mapped_column(String(128), nullable=True)
    budget_micro: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # per UTC day
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[float] = mapped_column(Double)
    expires_at: Mapped[float | None] = mapped_column(Double, nullable=True)
    revoked_at: Mapped[float | None] = mapped_column(Double, nullable=True)
    last_used_at: Mapped[float | None] = mapped_column(Double, nullable=True)
    day: Mapped[int] = mapped_column(Integer)  # the UTC day (Unix days) spent_micro counts
    spent_micro: Mapped[int] = mapped_column(BigInteger)
    reserved_micro: Mapped[int] = mapped_column(BigInteger)


class ApiKeyReservationRow(Base):
    """The worst-case price held for one running request of a budgeted key."""

    __tablename__ = "api_key_reservations"

    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(32), index=True)
    amount_micro: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Double)


class KeyNotFoundError(MycellmError):
    status = 404
    error_type = "not_found_error"
    code = "api_key_not_found"


class ApiKeyRecord(FrozenModel):
    """One API key as the node keeps it: no secret, only the digest of the key's text."""

    key_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    name: str = Field(default="", max_length=128)
    digest: bytes = Field(min_length=DIGEST_BYTES, max_length=DIGEST_BYTES)
    scopes: tuple[str, ...] = Field(min_length=1)
    network: str | None = Field(default=None, max_length=128)
    budget_micro: int | None = Field(default=None, ge=0)
    rpm: int | None = Field(default=None, ge=1)
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    last_used_at: float | None = None
    day: int = 0
    spent_micro: int = Field(default=0, ge=0)
    reserved_micro: int = Field(default=0, ge=0)

    def spent_on(self, day: int) -> int:
        """Micro-credits settled on ``day`` (a UTC day number)."""
        return self.spent_micro if self.day == day else 0

    def active(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


def utc_day(now: float) -> int:
    return int(now // DAY_S)


def _record(row: ApiKeyRow) -> ApiKeyRecord:
    values = {name: getattr(row, name) for name in ApiKeyRecord.model_fields}
    return ApiKeyRecord.model_validate(values | {"scopes": tuple(row.scopes.split(","))})


def _spent_today(today: int) -> Any:
    return case((ApiKeyRow.day == today, ApiKeyRow.spent_micro), else_=0)


class ApiKeyBook:
    """The API keys of one node store; the CLI uses it offline, the Ledger actor while the node runs."""

    def __init__(self, engine: AsyncEngine) -> None:
        writes = Writes(engine)
        self._dialect, self._sessions, self._transaction = writes.dialect, writes.sessions, writes.transaction

    async def _write(self, what: str, body: Callable[[AsyncSession], Awaitable[Answer]]) -> Answer:
        try:
            async with self._transaction() as session:
                return await body(session)
        except SQLAlchemyError as error:
            raise StoreError(f"cannot {what}: {error}") from error

    # -- keys -----------------------------------------------------------------------------------

    async def create(self, record: ApiKeyRecord) -> None:
        """Keep a new key; StoreError if its id is taken or the book holds MAX_KEYS keys."""
        values = record.model_dump() | {"scopes": ",".join(sorted(record.scopes))}
        statement = INSERTS[self._dialect](ApiKeyRow).values(values).on_conflict_do_nothing()

        async def body(session: AsyncSession) -> None:
            if not rowcount(await session.execute(statement)):
                raise StoreError(f"an API key with id {record.key_id} exists already")
            if (await session.scalar(select(func.count()).select_from(ApiKeyRow)) or 0) > MAX_KEYS:
                raise StoreError(f"this node holds {MAX_KEYS} API keys already: revoke some first")

        await self._write("create an API key", body)

    async def keys(self) -> list[ApiKeyRecord]:
        """Every key, revoked and expired ones included, oldest first."""
        async with self._sessions() as session:
            rows = await session.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at, ApiKeyRow.key_id))
            return [_record(row) for row in rows]

    async def key(self, key_id: str) -> ApiKeyRecord | None:
        async with self._sessions() as session:
            row = await session.get(ApiKeyRow, key_id)
            return None if row is None else _record(row)

    async def active_keys(self, now: float) -> int:
        """How many keys are neither revoked nor expired."""
        live = ApiKeyRow.revoked_at.is_(None), or_(ApiKeyRow.expires_at.is_(None), ApiKeyRow.expires_at > now)
        async with self._sessions() as session:
            return int(await session.scalar(select(func.count()).select_from(ApiKeyRow).where(*live)) or 0)

    async def revoke(self, key_id: str, now: float) -> ApiKeyRecord:
        """Revoke a key (the first revocation's time stays); KeyNotFoundError if there is none."""

        async def body(session: AsyncSession) -> ApiKeyRecord:
            await session.execute(
                update(ApiKeyRow).filter_by(key_id=key_id, revoked_at=None).values(revoked_at=now)
            )
            row = await session.get(ApiKeyRow, key_id, populate_existing=True)
            if row is None:
                raise KeyNotFoundError(f"no API key has the id {key_id[:32]}", param="key_id")
            return _record(row)

        return await self._write("revoke an API key", body)

    async def touch(self, used: dict[str, float]) -> None:
        """Note when keys were last used (a later time replaces an earlier one, never the reverse)."""

        async def body(session: AsyncSession) -> None:
            for key_id, at in sorted(used.items()):
                later = or_(ApiKeyRow.last_used_at.is_(None), ApiKeyRow.last_used_at < at)
                await session.execute(
                    update(ApiKeyRow).filter_by(key_id=key_id).where(later).values(last_used_at=at)
                )

        if used:
            await self._write("note API key use", body)

    # -- budgets --------------------------------------------------------------------------------

    async def reserve(self, key_id: str, request_id: str, amount: int, now: float) -> bool:
        """Hold ``amount`` micro-credits of the key's budget for one request (see the module text).

        False if that request holds its reservation already. BudgetExceededError (402) when the
        day's spending, the running reservations and ``amount`` exceed the budget; nothing changes.
        """
        today = utc_day(now)
        hold = INSERTS[self._dialect](ApiKeyReservationRow).values(
            request_id=request_id, key_id=key_id, amount_micro=amount, created_at=now
        )
        spent = _spent_today(today)
        fits = or_(
            ApiKeyRow.budget_micro.is_(None),
            spent + ApiKeyRow.reserved_micro + amount <= ApiKeyRow.budget_micro,
        )
        reserve = (
            update(ApiKeyRow)
            .filter_by(key_id=key_id, revoked_at=None)
            .where(fits)
            .values(spent_micro=spent, day=today, reserved_micro=ApiKeyRow.reserved_micro + amount)
        )

        async def body(session: AsyncSession) -> bool:
            # The first statement writes: on SQLite the transaction holds the write lock from here.
            if not rowcount(
                await session.execute(hold.on_conflict_do_nothing(index_elements=["request_id"]))
            ):
                return False
            if not rowcount(await session.execute(reserve)):
                raise await self._refusal(session, key_id, amount, today)
            return True

        return await self._write("reserve an API key's budget", body)

    @staticmethod
    async def _refusal(session: AsyncSession, key_id: str, amount: int, today: int) -> MycellmError:
        row = await session.get(ApiKeyRow, key_id)
        if row is None or row.revoked_at is not None:
            return AuthenticationError("this API key was revoked", code="api_key_revoked")
        spent = row.spent_micro if row.day == today else 0
        left = max(0, (row.budget_micro or 0) - spent - row.reserved_micro)
        return BudgetExceededError(
            f"the daily budget of API key {key_id} has {credits(left):.6f} credits left "
            f"(spent today {credits(spent):.6f}, running {credits(row.reserved_micro):.6f}); "
            f"this request may cost up to {credits(amount):.6f} credits"
        )

    async def settle(self, key_id: str, request_id: str, actual: int, now: float, *, reserved: bool) -> bool:
        """Count ``actual`` micro-credits as spent today and release the request's reservation.

        With ``reserved``, the request must still hold its reservation: a second settlement finds
        none and changes nothing (False). Without it (a key without budget), the price is added.
        """
        today = utc_day(now)
        release = delete(ApiKeyReservationRow).filter_by(request_id=request_id, key_id=key_id)

        async def body(session: AsyncSession) -> bool:
            held = 0
            if reserved:
                row = (await session.execute(release.returning(ApiKeyReservationRow.amount_micro))).first()
                if row is None:
                    return False
                held = int(row[0])
            change = update(ApiKeyRow).filter_by(key_id=key_id)
            await session.execute(
                change.values(
                    spent_micro=_spent_today(today) + actual,
                    day=today,
                    reserved_micro=ApiKeyRow.reserved_micro - held,
                )
            )
            return True

        return await self._write("settle an API key's request", body)

    async def release_reservations(self) -> int:
        """Drop every reservation (a node that starts has no request running); how many there were."""

        async def body(session: AsyncSession) -> int:
            dropped = rowcount(await session.execute(delete(ApiKeyReservationRow)))
            await session.execute(
                update(ApiKeyRow).where(ApiKeyRow.reserved_micro != 0).values(reserved_micro=0)
            )
            return dropped

        return await self._write("release API key reservations", body)
