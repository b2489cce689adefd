"""The ``mycellm`` command line: serve a node, chat with one, inspect it, identity, credits, networks, API keys."""

from __future__ import annotations

import os

from mycellm.cli.common import app

# Importing the command modules registers their commands on the one Typer app, in this order in
# the help: running and asking a node first, then identity, then credits.
# isort: off
from mycellm.cli import node  # noqa: F401
from mycellm.cli import account  # noqa: F401
from mycellm.cli import credits  # noqa: F401
from mycellm.cli import network  # noqa: F401
from mycellm.cli import joins  # noqa: F401
from mycellm.cli import keys  # noqa: F401
# isort: on


def main() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    app()
