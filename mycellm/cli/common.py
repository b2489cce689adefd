"""What the commands share: the Typer apps, consoles, options, config loading and node requests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console

from mycellm.config import NodeSettings, load_settings
from mycellm.errors import ConfigError, EngineError

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


def fail(message: str, code: int) -> typer.Exit:
    # soft_wrap: one message is one line, whatever the width Rich guesses for a pipe.
    errors.print(f"mycellm: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def settings_from(config: Path | None, **overrides: Any) -> NodeSettings:
    try:
        return load_settings(config, **overrides)
    except ConfigError as error:
        raise fail(f"config error: {error.message}", 2) from error


def check_models(settings: NodeSettings) -> None:
    """Catch a missing model file before Ray starts, as a config error naming the field."""
    from mycellm.engines.model_files import resolve_model_path

    for index, entry in enumerate(settings.model_entries):
        if entry.backend == "llama_cpp":
            try:
                resolve_model_path(entry.path)
            except EngineError as error:
                field = "model" if settings.model is not None and index == 0 else f"models.{index}.path"
                raise fail(f"config error: {field}: {error.message}", 2) from error


API_KEY_ENV = "MYCELLM_API_KEY"


def api_key() -> str | None:
    """The API key the commands present to a node (``MYCELLM_API_KEY``), if one is set."""
    return os.environ.get(API_KEY_ENV) or None


def get_json(url: str, path: str) -> Any:
    key = api_key()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.get(url.rstrip("/") + path, timeout=10.0, headers=headers)
    except httpx.HTTPError as error:
        raise fail(f"cannot reach {url}: {error}", 1) from error
    if response.status_code in (401, 403):
        needed = (
            "a valid API key (mycellm keys create)"
            if response.status_code == 401
            else "a key with that scope"
        )
        raise fail(
            f"{url}{path} answered {response.status_code}: {response.text[:200]} ({API_KEY_ENV}: {needed})", 1
        )
    if response.status_code >= 400:
        raise fail(f"{url}{path} answered {response.status_code}: {response.text[:200]}", 1)
    return response.json()


def node_root(url: str) -> str:
    return url.rstrip("/").removesuffix("/v1")
