"""Commands on the credit ledger: balance and transfers, and the audit of the books."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from mycellm.cli.common import (
    DEFAULT_URL,
    ConfigOption,
    DataDirOption,
    UrlOption,
    app,
    console,
    errors,
    fail,
    get_json,
    node_root,
    settings_from,
)
from mycellm.errors import MycellmError

ledger_app = typer.Typer(no_args_is_help=True, help="The credit ledger of this node.")


app.add_typer(ledger_app, name="ledger")


@app.command("credits")
def credits_command(
    url: UrlOption = DEFAULT_URL,
    account: Annotated[
        str | None, typer.Option("--account", help="Account id (default: the node's).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show a balance and its recent transfers (earned, spent, granted)."""
    query = f"?account={account}" if account else ""
    data = get_json(node_root(url), f"/v1/node/credits{query}")
    if as_json:
        console.print_json(json.dumps(data))
        return
    console.print(
        f"account {data['account_id'][:16]}  network {data['network_id']}  balance {data['balance']:.6f} credits"
    )
    table = Table("kind", "credits", "request", "when")
    for transfer in data["transfers"]:
        table.add_row(
            transfer["kind"],
            f"{transfer['credits']:+.6f}",
            str(transfer["request_id"] or "-"),
            transfer["created_at"],
        )
    console.print(table)


@ledger_app.command("audit")
def ledger_audit(config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Verify every receipt and recompute every balance; exit 1 on any mismatch."""
    import asyncio

    from mycellm.federation.held import HeldNetworks
    from mycellm.identity.keys import load_or_create_identity
    from mycellm.ledger.audit import audit
    from mycellm.ledger.pricing import PriceTable, credits
    from mycellm.ledger.store import Store

    settings = settings_from(config, data_dir=data_dir)

    async def run() -> list[Any]:
        identity = load_or_create_identity(settings.resolved_data_dir, node_name=settings.node_name)
        held = HeldNetworks(settings.resolved_data_dir, identity)
        held.refresh()
        store = await Store.open(settings.resolved_database_url)
        try:
            return [
                await audit(
                    store.engine,
                    PriceTable(network.description.prices.to_settings(settings.credits)),
                    network.network_id,
                )
                for network in held.networks()
            ]
        finally:
            await store.close()

    try:
        reports = asyncio.run(run())
    except MycellmError as error:
        raise fail(error.message, 1) from error
    for report in reports:
        console.print(
            f"network {report.network_id}: {report.receipts} receipts, {report.accounts} accounts, "
            f"issued {credits(report.issued):.6f}, balances {credits(report.total_balance):.6f}",
            highlight=False,
        )
        for problem in report.problems:
            errors.print(f"mismatch: {problem}", markup=False, highlight=False, soft_wrap=True)
    if not all(report.ok for report in reports):
        raise typer.Exit(1)
    console.print("ok: every receipt verifies and every balance matches its receipts", highlight=False)
