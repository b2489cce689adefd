"""The ``mycellm`` command line: serve a node, chat with one, inspect models, status and identity."""

from __future__ import annotations

import importlib
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from mycellm.config import NodeSettings, load_settings
from mycellm.errors import ConfigError, EngineError, IdentityError, MycellmError
from mycellm.identity import Role

app = typer.Typer(no_args_is_help=True, add_completion=False, help="mycellm: peer-to-peer LLM inference.")
account_app = typer.Typer(no_args_is_help=True, help="Account and device identity.")
app.add_typer(account_app, name="account")
device_app = typer.Typer(no_args_is_help=True, help="Devices of this node's account: add, list, revoke.")
app.add_typer(device_app, name="device")
console = Console()
errors = Console(stderr=True)

DEFAULT_URL = "http://127.0.0.1:8420/v1"
UrlOption = Annotated[str, typer.Option("--url", envvar="MYCELLM_URL", help="Node API root (…/v1).")]
ConfigOption = Annotated[Path | None, typer.Option("--config", help="YAML config file.")]
DataDirOption = Annotated[Path | None, typer.Option("--data-dir", help="Node data directory.")]


def _fail(message: str, code: int) -> typer.Exit:
    # soft_wrap: one message is one line, whatever the width Rich guesses for a pipe.
    errors.print(f"mycellm: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _settings(config: Path | None, **overrides: Any) -> NodeSettings:
    try:
        return load_settings(config, **overrides)
    except ConfigError as error:
        raise _fail(f"config error: {error.message}", 2) from error


def _check_models(settings: NodeSettings) -> None:
    """Catch a missing model file before Ray starts, as a config error naming the field."""
    from mycellm.engines.llama_cpp import resolve_model_path

    for index, entry in enumerate(settings.model_entries):
        if entry.backend == "llama_cpp":
            try:
                resolve_model_path(entry.path)
            except EngineError as error:
                field = "model" if settings.model is not None and index == 0 else f"models.{index}.path"
                raise _fail(f"config error: {field}: {error.message}", 2) from error


@app.command()
def serve(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option("--host", help="HTTP bind address.")] = None,
    port: Annotated[int | None, typer.Option("--port", help="HTTP port (OpenAI API).")] = None,
    data_dir: DataDirOption = None,
    model: Annotated[
        str | None, typer.Option("--model", help="GGUF path, or 'smollm2' for the bundled model.")
    ] = None,
) -> None:
    """Run a node in the foreground until SIGINT/SIGTERM."""
    settings = _settings(config, host=host, port=port, data_dir=data_dir, model=model)
    _check_models(settings)
    # The Ray side lives in actors/; it is imported only by the command that runs a node.
    node_module = importlib.import_module("actors.node")
    try:
        code = node_module.run_node(settings)
    except IdentityError as error:
        raise _fail(f"identity error: {error.message}", 1) from error
    except MycellmError as error:
        raise _fail(error.message, 1) from error
    raise typer.Exit(code)


@account_app.command("show")
def account_show(config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Print this node's peer id, account id and certificate (creating the identity if needed)."""
    from mycellm.identity import load_or_create_identity

    settings = _settings(config, data_dir=data_dir)
    try:
        identity = load_or_create_identity(settings.resolved_data_dir, node_name=settings.node_name)
    except IdentityError as error:
        raise _fail(f"identity error: {error.message}", 1) from error
    certificate = identity.certificate
    console.print(f"peer id:    {identity.peer_id}", highlight=False)
    console.print(f"account id: {identity.account_id}", highlight=False)
    console.print(f"device:     {certificate.name} ({certificate.role})", highlight=False)
    console.print(
        f"expires:    {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(certificate.expires_at))}",
        highlight=False,
    )


@device_app.command("add")
def device_add(
    name: Annotated[str, typer.Argument(help="Name of the new device.")],
    out: Annotated[Path, typer.Option("--out", help="Data directory to create for the new device.")],
    role: Annotated[Role, typer.Option("--role", help="Role the certificate grants.")] = "node",
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Certify a new device with this node's account key and write its identity to --out."""
    from mycellm.devices import add_device

    settings = _settings(config, data_dir=data_dir)
    out = out.expanduser().resolve()
    try:
        certificate = add_device(settings.resolved_data_dir, name, out, role=role)
    except IdentityError as error:
        raise _fail(f"identity error: {error.message}", 1) from error
    console.print(f"added device {certificate.name} ({certificate.role})", highlight=False)
    console.print(f"peer id: {certificate.peer_id}", highlight=False)
    console.print(f"run it with: mycellm serve --data-dir {shlex.quote(str(out))}", highlight=False)


def _utc(timestamp: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(timestamp))


@device_app.command("list")
def device_list(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List this node's own device and every device its account certified."""
    from mycellm.devices import list_devices

    settings = _settings(config, data_dir=data_dir)
    try:
        records = list_devices(settings.resolved_data_dir)
    except IdentityError as error:
        raise _fail(f"identity error: {error.message}", 1) from error
    if as_json:
        data = [
            {
                "peer_id": record.certificate.peer_id,
                "name": record.certificate.name,
                "role": record.certificate.role,
                "issued_at": record.certificate.issued_at,
                "expires_at": record.certificate.expires_at,
                "revoked": record.revoked,
                "own": record.own,
            }
            for record in records
        ]
        console.print_json(json.dumps(data))
        return
    now = time.time()
    table = Table("peer id", "name", "role", "expires", "status")
    for record in records:
        certificate = record.certificate
        states = ["own"] if record.own else []
        if record.revoked:
            states.append("revoked")
        elif certificate.expires_at <= now:
            states.append("expired")
        table.add_row(
            certificate.peer_id[:16],
            certificate.name,
            certificate.role,
            _utc(certificate.expires_at),
            ", ".join(states) or "active",
        )
    console.print(table)


@device_app.command("revoke")
def device_revoke(
    device: Annotated[str, typer.Argument(help="Device name, or peer id (a prefix of 8+ hex characters).")],
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Revoke a device of this account and write the new signed revocation list."""
    from mycellm.devices import load_revocation_list, revoke_device

    settings = _settings(config, data_dir=data_dir)
    try:
        previous = load_revocation_list(settings.resolved_data_dir)
        revocations = revoke_device(settings.resolved_data_dir, device)
    except IdentityError as error:
        raise _fail(f"identity error: {error.message}", 1) from error
    if previous is not None and previous.serial == revocations.serial:
        console.print(f"{device} was already revoked", highlight=False)
    console.print(
        f"revocation list serial {revocations.serial}: {len(revocations.revoked)} device(s) revoked",
        highlight=False,
    )


def _get(url: str, path: str) -> Any:
    try:
        response = httpx.get(url.rstrip("/") + path, timeout=10.0)
    except httpx.HTTPError as error:
        raise _fail(f"cannot reach {url}: {error}", 1) from error
    if response.status_code >= 400:
        raise _fail(f"{url}{path} answered {response.status_code}: {response.text[:200]}", 1)
    return response.json()


def _node_root(url: str) -> str:
    return url.rstrip("/").removesuffix("/v1")


@app.command()
def models(url: UrlOption = DEFAULT_URL, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the models a node serves and where."""
    data = _get(url, "/models")["data"]
    if as_json:
        console.print_json(json.dumps(data))
        return
    table = Table("model", "backend", "context", "tier", "routes")
    for card in data:
        extra = card.get("mycellm", {})
        routes = ", ".join(f"{route['kind']}:{route['target']}" for route in extra.get("routes", []))
        table.add_row(
            card["id"],
            str(extra.get("backend")),
            str(extra.get("context_tokens")),
            str(extra.get("tier")),
            routes,
        )
    console.print(table)


@app.command()
def status(url: UrlOption = DEFAULT_URL, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show how a node is doing: identity, uptime, workers, requests served."""
    data = _get(_node_root(url), "/v1/node/status")
    if as_json:
        console.print_json(json.dumps(data))
        return
    totals = data["requests"]
    console.print(
        f"node {data['node_name']}  peer {data['peer_id'][:16]}  version {data['version']}  up {data['uptime_s']:.0f} s"
    )
    console.print(
        f"requests {totals['requests']} (failed {totals['failures']}), tokens in {totals['prompt_tokens']}, "
        f"out {totals['completion_tokens']}"
    )
    table = Table("worker", "backend", "ready", "active", "served", "models")
    for worker in data["workers"]:
        names = ", ".join(model["name"] for model in worker.get("models", []))
        table.add_row(
            worker["name"],
            str(worker.get("backend")),
            str(worker.get("ready")),
            str(worker.get("active_requests", "-")),
            str(worker.get("served_requests", "-")),
            names,
        )
    console.print(table)


@app.command()
def peers(url: UrlOption = DEFAULT_URL, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show the peers a node knows: state, address, round trip, load, models, success rate."""
    data = _get(_node_root(url), "/v1/node/peers")
    if as_json:
        console.print_json(json.dumps(data))
        return
    console.print(f"QUIC {data.get('address') or '-'}  connected {len(data['connected'])}")
    table = Table("peer", "name", "state", "address", "rtt ms", "load", "success", "models")
    for peer in data["data"]:
        rtt = peer.get("rtt_ms")
        table.add_row(
            peer["peer_id"][:16],
            str(peer.get("node_name") or "-"),
            peer["state"],
            str(peer.get("address") or "-"),
            "-" if rtt is None else f"{rtt:.1f}",
            str(peer.get("load", 0)),
            f"{peer.get('success_rate', 1.0):.2f}",
            ", ".join(model["name"] for model in peer.get("models", [])),
        )
    console.print(table)


@app.command()
def chat(
    url: UrlOption = DEFAULT_URL,
    model: Annotated[str, typer.Option("--model", help="Model id, or 'auto'.")] = "auto",
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None,
    temperature: Annotated[float, typer.Option("--temperature")] = 0.7,
    max_tokens: Annotated[int, typer.Option("--max-tokens")] = 512,
) -> None:
    """A streaming chat REPL against a node. Commands: /reset, /model NAME, /system TEXT, /exit."""
    from mycellm.chat import ChatSession

    session = ChatSession(url=url, model=model, system=system, temperature=temperature, max_tokens=max_tokens)
    interactive = sys.stdin.isatty()
    console.print(f"[bold]mycellm chat[/bold] → {url} (model {model}); /exit to leave")
    while True:
        try:
            line = input("you> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            break
        if not session.handle(line, console):
            break


def main() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    app()


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
    data = _get(_node_root(url), f"/v1/node/credits{query}")
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

    from mycellm.ledger.audit import audit
    from mycellm.ledger.pricing import PriceTable, credits
    from mycellm.ledger.store import Store

    settings = _settings(config, data_dir=data_dir)

    async def run() -> Any:
        store = await Store.open(settings.resolved_database_url)
        try:
            return await audit(store.engine, PriceTable(settings.credits), settings.network_id)
        finally:
            await store.close()

    try:
        report = asyncio.run(run())
    except MycellmError as error:
        raise _fail(error.message, 1) from error
    console.print(
        f"network {report.network_id}: {report.receipts} receipts, {report.accounts} accounts, "
        f"issued {credits(report.issued):.6f}, balances {credits(report.total_balance):.6f}",
        highlight=False,
    )
    for problem in report.problems:
        errors.print(f"mismatch: {problem}", markup=False, highlight=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(1)
    console.print("ok: every receipt verifies and every balance matches its receipts", highlight=False)
