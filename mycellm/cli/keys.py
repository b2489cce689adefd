"""Commands on the node's API keys, offline on its database: create (the key is printed once), list, revoke."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.table import Table

from mycellm.cli.common import ConfigOption, DataDirOption, app, console, errors, fail, settings_from
from mycellm.config import NodeSettings
from mycellm.errors import MycellmError

if TYPE_CHECKING:
    from mycellm.ledger.api_keys import ApiKeyBook

keys_app = typer.Typer(
    no_args_is_help=True, help="API keys of this node's HTTP API: create, list, revoke (offline)."
)


app.add_typer(keys_app, name="keys")


Answer = TypeVar("Answer")

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def with_key_book(settings: NodeSettings, work: Callable[[ApiKeyBook], Awaitable[Answer]]) -> Answer:
    """Run ``work`` on the API keys in the node's database, opened (and migrated) for it."""
    from mycellm.ledger.api_keys import ApiKeyBook
    from mycellm.ledger.store import Store

    async def run() -> Answer:
        store = await Store.open(settings.resolved_database_url)
        try:
            return await work(ApiKeyBook(store.engine))
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except MycellmError as error:
        raise fail(f"keys: {error.message}", 1) from error


def check_exposure(settings: NodeSettings) -> None:
    """Refuse (exit 2) a node bound beyond loopback with no active key, unless anonymous callers are allowed."""
    from mycellm.api.auth import exposure_problem, is_loopback

    if is_loopback(settings.host) or settings.auth.allow_anonymous is True:
        return

    async def count(book: ApiKeyBook) -> int:
        return await book.active_keys(time.time())

    problem = exposure_problem(settings.auth, settings.host, with_key_book(settings, count))
    if problem is not None:
        raise fail(f"config error: {problem}", 2)


def _limits(
    scopes: list[str], budget: float | None, rpm: int | None, expires: str | None
) -> tuple[int | None, float | None]:
    """Check the terms before the database is opened: the budget in micro-credits and the validity."""
    from mycellm.api.keys import MAX_BUDGET_CREDITS, MAX_RPM, SCOPES, budget_micro
    from mycellm.federation.authority import parse_duration

    for scope in scopes:
        if scope not in SCOPES:
            raise fail(f"--scope {scope[:40]!r} is not one of {', '.join(SCOPES)}", 2)
    if budget is not None and not 0 <= budget <= MAX_BUDGET_CREDITS:
        raise fail(f"--budget must be 0..{MAX_BUDGET_CREDITS:.0f} credits per day", 2)
    if rpm is not None and not 1 <= rpm <= MAX_RPM:
        raise fail(f"--rpm must be 1..{MAX_RPM}", 2)
    try:
        validity_s = None if expires is None else float(parse_duration(expires))
    except ValueError as error:
        raise fail(f"--expires: {error}", 2) from error
    return budget_micro(budget), validity_s


@keys_app.command("create")
def keys_create(
    scope: Annotated[
        list[str], typer.Option("--scope", help="inference, read or admin (repeat for several).")
    ],
    network: Annotated[
        str | None,
        typer.Option("--network", help="Network id or name of its requests (default: the node's)."),
    ] = None,
    budget: Annotated[float | None, typer.Option("--budget", help="Credits per UTC day.")] = None,
    rpm: Annotated[int | None, typer.Option("--rpm", help="Requests per minute.")] = None,
    expires: Annotated[str | None, typer.Option("--expires", help="Valid for: 30m, 24h, 30d.")] = None,
    name: Annotated[str, typer.Option("--name", help="A label for people.")] = "",
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create an API key and print it: this is the only time its text is shown (the node keeps a digest)."""
    from mycellm.api.keys import key_view, mint_key

    micro, validity_s = _limits(scope, budget, rpm, expires)
    if len(name) > 128 or (network is not None and not 1 <= len(network) <= 128):
        raise fail("--name and --network are at most 128 characters (a network at least 1)", 2)
    settings = settings_from(config, data_dir=data_dir)
    if network is not None:
        network = _network_id(settings, network)
    now = time.time()
    text, record = mint_key(
        scopes=tuple(scope),  # type: ignore[arg-type]  # checked against Scope in _limits
        now=now,
        name=name,
        network=network,
        budget_micro=micro,
        rpm=rpm,
        expires_at=None if validity_s is None else now + validity_s,
    )

    async def create(book: ApiKeyBook) -> None:
        await book.create(record)

    with_key_book(settings, create)
    if as_json:
        console.print_json(json.dumps(key_view(record, now) | {"key": text}))
        return
    console.print(text, highlight=False, markup=False, soft_wrap=True)
    errors.print(
        f"API key {record.key_id} ({', '.join(record.scopes)}) created; its text is shown only now",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def _network_id(settings: NodeSettings, name_or_id: str) -> str:
    """The id of one of the node's networks (a key keeps the id: a name may be ambiguous later)."""
    from mycellm.federation.held import HeldNetworks
    from mycellm.identity.keys import load_or_create_identity

    identity = load_or_create_identity(settings.resolved_data_dir, node_name=settings.node_name)
    held = HeldNetworks(settings.resolved_data_dir, identity)
    held.refresh()
    try:
        return held.find(name_or_id).network_id
    except MycellmError as error:
        raise fail(error.message, 2) from error


def _when(timestamp: float | None) -> str:
    return "-" if timestamp is None else time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(timestamp))


@keys_app.command("list")
def keys_list(
    config: ConfigOption = None, data_dir: DataDirOption = None, as_json: JsonOption = False
) -> None:
    """List the node's API keys (never their secrets): scopes, network, limits, spending, use."""
    from mycellm.api.keys import key_view

    settings = settings_from(config, data_dir=data_dir)

    async def listed(book: ApiKeyBook) -> list[dict[str, Any]]:
        now = time.time()
        return [key_view(record, now) for record in await book.keys()]

    views = with_key_book(settings, listed)
    if as_json:
        console.print_json(json.dumps(views))
        return
    columns = ("id", "name", "scopes", "network", "budget", "spent today", "rpm", "created", "expires")
    table = Table(*columns, "revoked", "last used")
    for view in views:
        table.add_row(
            view["id"],
            view["name"] or "-",
            ",".join(view["scopes"]),
            view["network"] or "default",
            "-" if view["budget"] is None else f"{view['budget']:g}",
            f"{view['spent_today']:.6f}",
            str(view["rpm"] or "-"),
            _when(view["created_at"]),
            _when(view["expires_at"]),
            _when(view["revoked_at"]),
            _when(view["last_used_at"]),
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (the 16 hex characters after mck_).")],
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Revoke an API key: a running node refuses it within about a second."""
    from mycellm.api.keys import key_id_of

    settings = settings_from(config, data_dir=data_dir)
    wanted = key_id_of(key_id) or key_id  # the whole key text names its id too

    async def revoke(book: ApiKeyBook) -> float | None:
        return (await book.revoke(wanted, time.time())).revoked_at

    revoked_at = with_key_book(settings, revoke)
    console.print(f"API key {wanted} revoked at {_when(revoked_at)}", highlight=False, markup=False)
