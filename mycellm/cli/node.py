"""Commands that run a node or talk to a running one: serve, models, status, peers, chat."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.table import Table

from mycellm.cli.common import (
    DEFAULT_URL,
    ConfigOption,
    DataDirOption,
    UrlOption,
    api_key,
    app,
    check_models,
    console,
    fail,
    get_json,
    node_root,
    settings_from,
)
from mycellm.errors import ConfigError, IdentityError, MycellmError


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
    settings = settings_from(config, host=host, port=port, data_dir=data_dir, model=model)
    check_models(settings)
    from mycellm.cli.keys import check_exposure

    check_exposure(settings)  # before Ray: a node open to the network needs a key (or says it wants none)
    # The Ray side (serve_app -> actors) is imported only by the command that runs a node: the
    # one arrow out of the core, declared in .importlinter.
    from serve_app import run_node

    try:
        code = run_node(settings)
    except ConfigError as error:
        raise fail(f"config error: {error.message}", 2) from error
    except IdentityError as error:
        raise fail(f"identity error: {error.message}", 1) from error
    except MycellmError as error:
        raise fail(error.message, 1) from error
    raise typer.Exit(code)


@app.command()
def models(url: UrlOption = DEFAULT_URL, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the models a node serves and where."""
    data = get_json(url, "/models")["data"]
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
    data = get_json(node_root(url), "/v1/node/status")
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
    data = get_json(node_root(url), "/v1/node/peers")
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
    from mycellm.cli.chat import ChatSession

    session = ChatSession(
        url=url, model=model, system=system, temperature=temperature, max_tokens=max_tokens, api_key=api_key()
    )
    interactive = sys.stdin.isatty()
    console.print(f"[bold]mycellm chat[/bold] → {url} (model {model}); /exit to leave")
    while True:
        try:
            line = input("you> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            break
        if not session.handle(line, console):
            break
