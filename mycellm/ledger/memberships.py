"""MembershipBook: an authority's books of invites, memberships and public joins, exact under concurrency.

The book stores plain values and opaque bytes (the signed certificates come from the caller's
``issue``), so it does not depend on how invites and certificates are signed.

Exactness. A redemption is one transaction: the redemption row, one atomic conditional
``UPDATE invites SET uses = uses + 1 WHERE ... uses < max_uses AND NOT revoked AND expires_at > now``
and the membership row. On PostgreSQL concurrent UPDATEs of one invite queue on its row lock and
each re-evaluates the condition on the row the previous one committed. A public join first locks
its network's row (``federation_networks``, SELECT ... FOR UPDATE), so the joins of a network count
and insert one after another. On SQLite the writers of a process queue on one lock per engine, and
each transaction's first statement writes, so it holds the database's write lock from its start.

Replays. An account that already redeemed an invite gets its membership back as it is and uses no
second use; so does a member with a valid certificate redeeming another invite or joining again. An
expired member is renewed by a new admission (which counts). A revoked member is refused
(``membership_revoked``). Every refusal rolls its transaction back: nothing changes.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any, cast

from pydantic import Field
from sqlalchemy import Select, and_, delete, func, insert, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from mycellm.errors import MembershipError
from mycellm.ledger import federation_tables as tables
from mycellm.ledger.federation_tables import InviteRedemptionRow, InviteRow, JoinAttemptRow, MembershipRow
from mycellm.ledger.store import INSERTS, StoreError
from mycellm.ledger.writes import Writes, rowcount
from mycellm.types import FrozenModel

HOUR_S = 3600.0
DAY_S = 86400.0
ATTEMPTS = 3  # a membership inserted concurrently by another path: look again, a bounded number of times

# What ``issue`` returns: the signed membership certificate and its expiry (Unix seconds).
Issuer = Callable[[], tuple[bytes, float]]


class JoinRateLimitedError(MembershipError):
    status = 429
    error_type = "rate_limit_error"
    code = "join_rate_limited"


class Membership(FrozenModel):
    network_id: str
    account_id: str
    role: str
    issued_at: float
    expires_at: float
    certificate: bytes
    revoked_at: float | None = None
    source: str | None = None


class InviteRecord(FrozenModel):
    network_id: str
    nonce: bytes
    role: str
    max_uses: int = Field(ge=1)
    uses: int = Field(ge=0)
    expires_at: float
    bind_key: bytes | None = None
    revoked: bool = False
    created_at: float


class _Existing(Exception):  # a control-flow signal, not an error
    """Leave the transaction without changes and answer with the existing membership (its argument)."""


class _Conflict(Exception):  # a control-flow signal, not an error
    """A concurrent transaction made the account a member first: roll back and look again."""


def _member(network_id: str, account_id: str, *conditions: Any) -> Any:  # one membership's WHERE clause
    return and_(MembershipRow.network_id == network_id, MembershipRow.account_id == account_id, *conditions)


def _membership(row: Any, model: type[Any] = Membership) -> Any:
    return model.model_validate({name: getattr(row, name) for name in model.model_fields})


class MembershipBook:
    """The invites and members of every network this authority keeps books for, in one database."""

    def __init__(self, engine: AsyncEngine) -> None:
        writes = Writes(engine)
        self._dialect, self._sessions, self._transaction = writes.dialect, writes.sessions, writes.transaction

    async def _retrying(self, what: str, body: Callable[[AsyncSession], Any]) -> Any:
        """Run ``body`` in a write transaction; _Existing answers without changes, _Conflict retries."""
        for _attempt in range(ATTEMPTS):
            try:
                async with self._transaction() as session:
                    return await body(session)
            except _Existing as existing:
                return existing.args[0]
            except _Conflict:
                continue
            except SQLAlchemyError as error:
                raise StoreError(f"cannot {what}: {error}") from error
        raise StoreError(f"cannot {what}: it keeps conflicting with concurrent joins")

    def _insert(self, table: Any) -> Any:
        return INSERTS[self._dialect](table)

    # -- invites ------------------------------------------------------------------------------

    async def record_invite(
        self,
        network_id: str,
        nonce: bytes,
        role: str,
        max_uses: int,
        expires_at: float,
        bind_key: bytes | None = None,
        *,
        now: float | None = None,
    ) -> bool:
        """Keep an invite the authority signed; False if it is already kept with the same terms."""
        if len(nonce) != tables.NONCE_BYTES or max_uses < 1:
            problem = f"{len(nonce)}-byte nonce, max_uses {max_uses}"
            raise MembershipError(
                f"an invite needs a 16-byte nonce and max_uses >= 1 ({problem})", code="invite_invalid"
            )
        terms = {"role": role, "max_uses": max_uses, "expires_at": expires_at, "bind_key": bind_key}
        values = {"network_id": network_id, "nonce": nonce, "uses": 0, "revoked": False} | terms
        statement = (
            self._insert(InviteRow)
            .values(created_at=time.time() if now is None else now, **values)
            .on_conflict_do_nothing(index_elements=["network_id", "nonce"])
        )

        async def body(session: AsyncSession) -> bool:
            if rowcount(await session.execute(statement)):
                return True
            kept = await session.get(InviteRow, (network_id, nonce))
            if kept is None or {name: getattr(kept, name) for name in terms} != terms:
                raise MembershipError("another invite is kept with this nonce", code="invite_conflict")
            return False

        return bool(await self._retrying("record an invite", body))

    async def revoke_invite(self, network_id: str, nonce: bytes) -> bool:
        """Refuse every later redemption of an invite; False if it was revoked already."""

        async def body(session: AsyncSession) -> bool:
            result = await session.execute(
                update(InviteRow)
                .filter_by(network_id=network_id, nonce=nonce, revoked=False)
                .values(revoked=True)
            )
            if rowcount(result):
                return True
            if await session.get(InviteRow, (network_id, nonce)) is None:
                raise MembershipError("no such invite", code="invite_unknown")
            return False

        return bool(await self._retrying("revoke an invite", body))

    async def invite(self, network_id: str, nonce: bytes) -> InviteRecord | None:
        async with self._sessions() as session:
            row = await session.get(InviteRow, (network_id, nonce))
            return None if row is None else _membership(row, InviteRecord)

    # -- redemption ---------------------------------------------------------------------------

    async def redeem(
        self,
        network_id: str,
        nonce: bytes,
        account_id: str,
        now: float,
        issue: Issuer,
        *,
        source: str | None = None,
    ) -> Membership:
        """Make ``account_id`` a member through an invite, using one of its uses (see the module text).

        MembershipError (403, nothing changes): invite_unknown, invite_revoked, invite_expired,
        invite_used_up, invite_bound (the invite is bound to another account's key), membership_revoked.
        """

        async def body(session: AsyncSession) -> Membership:
            # The first statement writes: on SQLite the transaction holds the write lock from here.
            inserted = await session.execute(
                self._insert(InviteRedemptionRow)
                .values(network_id=network_id, nonce=nonce, account_id=account_id, redeemed_at=now)
                .on_conflict_do_nothing(index_elements=["network_id", "nonce", "account_id"])
            )
            replay = not rowcount(inserted)
            expired = await self._answer_existing(session, network_id, account_id, now, replay)
            if replay:
                raise _Conflict  # redeemed by a transaction whose membership we could not see yet
            used = await session.execute(
                update(InviteRow)
                .filter_by(network_id=network_id, nonce=nonce)
                .where(
                    InviteRow.uses < InviteRow.max_uses,
                    InviteRow.revoked.is_(False),
                    InviteRow.expires_at > now,
                )
                .values(uses=InviteRow.uses + 1)
                .returning(InviteRow.role, InviteRow.bind_key)
            )
            granted = used.first()
            if granted is None:
                raise await self._refusal(session, network_id, nonce, now)
            role, bind_key = granted
            if bind_key is not None and hashlib.sha256(bind_key).hexdigest() != account_id:
                raise MembershipError("this invite is bound to another account", code="invite_bound")
            draft = {"network_id": network_id, "account_id": account_id, "role": role, "source": source}
            return await self._admit(session, draft | {"issued_at": now}, issue, expired)

        return cast(Membership, await self._retrying("redeem an invite", body))

    async def _answer_existing(
        self, session: AsyncSession, network_id: str, account_id: str, now: float, replay: bool = False
    ) -> bool:
        """_Existing for a member (or a replay), MembershipError for a revoked one; else whether the
        account's membership expired (the admission then renews it)."""
        row = await session.get(MembershipRow, (network_id, account_id), populate_existing=True)
        if row is None:
            return False
        if row.revoked_at is not None:
            raise MembershipError(f"account {account_id[:12]} was revoked", code="membership_revoked")
        if replay or row.expires_at > now:
            raise _Existing(_membership(row))
        return True

    @staticmethod
    async def _refusal(session: AsyncSession, network_id: str, nonce: bytes, now: float) -> MembershipError:
        invite = await session.get(InviteRow, (network_id, nonce))
        if invite is None:
            return MembershipError("no such invite", code="invite_unknown")
        if invite.revoked:
            return MembershipError("this invite was revoked", code="invite_revoked")
        if invite.expires_at <= now:
            return MembershipError("this invite has expired", code="invite_expired")
        return MembershipError(f"this invite was used {invite.max_uses} times already", code="invite_used_up")

    async def _admit(
        self, session: AsyncSession, draft: dict[str, Any], issue: Issuer, expired: bool
    ) -> Membership:
        """Write the membership of ``draft`` (network_id, account_id, role, issued_at, source)."""
        certificate, expires_at = issue()
        membership = Membership(certificate=certificate, expires_at=expires_at, **draft)
        network_id, account_id, now = draft["network_id"], draft["account_id"], draft["issued_at"]
        if expired:
            written = await session.execute(
                update(MembershipRow)
                .where(_member(network_id, account_id, MembershipRow.expires_at <= now))
                .where(MembershipRow.revoked_at.is_(None))
                .values(membership.model_dump(exclude={"network_id", "account_id"}))
            )
        else:
            written = await session.execute(
                self._insert(MembershipRow)
                .values(membership.model_dump())
                .on_conflict_do_nothing(index_elements=["network_id", "account_id"])
            )
        if not rowcount(written):
            raise _Conflict  # changed concurrently (another invite, a public join, a revocation)
        return membership

    # -- public networks ----------------------------------------------------------------------

    async def admit_public(
        self,
        network_id: str,
        account_id: str,
        source: str,
        now: float,
        per_hour: int,
        per_day: int,
        issue: Issuer,
        *,
        role: str = "member",
    ) -> Membership:
        """Admit a newcomer to a public network unless ``source`` had its joins of the hour or the day.

        JoinRateLimitedError (429) beyond the limits; a refusal records nothing, so the limits count
        admissions. A member joining again gets its membership back and counts nothing.
        """

        async def body(session: AsyncSession) -> Membership:
            await self._lock_network(session, network_id, now)
            expired = await self._answer_existing(session, network_id, account_id, now)
            # Joins older than a day count for nothing: the table stays bounded by the daily limits.
            stale = (
                delete(JoinAttemptRow)
                .filter_by(network_id=network_id)
                .where(JoinAttemptRow.at <= now - DAY_S)
            )
            await session.execute(stale)
            counted = select(func.count().filter(JoinAttemptRow.at > now - HOUR_S), func.count())
            counted = counted.filter_by(network_id=network_id, source=source)
            hour, day = (await session.execute(counted)).one()
            if hour >= per_hour or day >= per_day:
                limit = f"{per_hour} an hour" if hour >= per_hour else f"{per_day} a day"
                raise JoinRateLimitedError(f"too many joins from this source ({limit})", param="source")
            await session.execute(insert(JoinAttemptRow).values(network_id=network_id, source=source, at=now))
            draft = {"network_id": network_id, "account_id": account_id, "role": role, "source": source}
            return await self._admit(session, draft | {"issued_at": now}, issue, expired)

        return cast(Membership, await self._retrying("admit a member", body))

    async def _lock_network(self, session: AsyncSession, network_id: str, now: float) -> None:
        """Take the network's row for this transaction: its joins run one after another."""
        await session.execute(
            self._insert(tables.FederationNetworkRow)
            .values(network_id=network_id, created_at=now)
            .on_conflict_do_nothing(index_elements=["network_id"])
        )
        locked: Select[Any] = select(tables.FederationNetworkRow.network_id).filter_by(network_id=network_id)
        await session.execute(locked.with_for_update())  # SQLite: the write lock taken above

    # -- members ------------------------------------------------------------------------------

    async def members(self, network_id: str, *, include_revoked: bool = False) -> list[Membership]:
        query = select(MembershipRow).where(MembershipRow.network_id == network_id)
        if not include_revoked:
            query = query.where(MembershipRow.revoked_at.is_(None))
        async with self._sessions() as session:
            rows = await session.scalars(query.order_by(MembershipRow.account_id))
            return [_membership(row) for row in rows]

    async def membership(self, network_id: str, account_id: str) -> Membership | None:
        async with self._sessions() as session:
            row = await session.get(MembershipRow, (network_id, account_id))
            return None if row is None else _membership(row)

    async def revoke_member(self, network_id: str, account_id: str, now: float) -> Membership:
        """Revoke a membership (the first revocation's time stays); membership_unknown if there is none."""

        async def body(session: AsyncSession) -> Membership:
            live = _member(network_id, account_id, MembershipRow.revoked_at.is_(None))
            await session.execute(update(MembershipRow).where(live).values(revoked_at=now))
            return await self._member_row(session, network_id, account_id, revoked_is_error=False)

        return cast(Membership, await self._retrying("revoke a member", body))

    async def renew(
        self, network_id: str, account_id: str, now: float, issue: Issuer, *, role: str | None = None
    ) -> Membership:
        """Replace a member's certificate with a new one (and its role, if given)."""

        async def body(session: AsyncSession) -> Membership:
            certificate, expires_at = issue()
            changes: dict[str, Any] = {"certificate": certificate, "issued_at": now, "expires_at": expires_at}
            if role is not None:
                changes["role"] = role
            live = _member(network_id, account_id, MembershipRow.revoked_at.is_(None))
            await session.execute(update(MembershipRow).where(live).values(changes))
            return await self._member_row(session, network_id, account_id, revoked_is_error=True)

        return cast(Membership, await self._retrying("renew a member", body))

    @staticmethod
    async def _member_row(
        session: AsyncSession, network_id: str, account_id: str, *, revoked_is_error: bool
    ) -> Membership:
        row = await session.get(MembershipRow, (network_id, account_id), populate_existing=True)
        if row is None:
            raise MembershipError(f"account {account_id[:12]} is no member", code="membership_unknown")
        if revoked_is_error and row.revoked_at is not None:  # the update matched nothing: no change
            raise MembershipError(f"account {account_id[:12]} was revoked", code="membership_revoked")
        return _membership(row)
