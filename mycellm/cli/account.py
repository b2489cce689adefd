"""Commands on this node's identity: the account, and the devices it certified or revoked."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mycellm.cli.common import (
    ConfigOption,
    DataDirOption,
    account_app,
    console,
    device_app,
    fail,
    settings_from,
)
from mycellm.errors import IdentityError
from mycellm.identity.certificates import Role


@account_app.command("show")
def account_show(config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Print this node's peer id, account id and certificate (creating the identity if needed)."""
    from mycellm.identity.keys import load_or_create_identity

    settings = settings_from(config, data_dir=data_dir)
    try:
        identity = load_or_create_identity(settings.resolved_data_dir, node_name=settings.node_name)
    except IdentityError as error:
        raise fail(f"identity error: {error.message}", 1) from error
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
    from mycellm.identity.devices import add_device

    settings = settings_from(config, data_dir=data_dir)
    out = out.expanduser().resolve()
    try:
        certificate = add_device(settings.resolved_data_dir, name, out, role=role)
    except IdentityError as error:
        raise fail(f"identity error: {error.message}", 1) from error
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
    from mycellm.identity.devices import list_devices

    settings = settings_from(config, data_dir=data_dir)
    try:
        records = list_devices(settings.resolved_data_dir)
    except IdentityError as error:
        raise fail(f"identity error: {error.message}", 1) from error
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
    from mycellm.identity.devices import load_revocation_list, revoke_device

    settings = settings_from(config, data_dir=data_dir)
    try:
        previous = load_revocation_list(settings.resolved_data_dir)
        revocations = revoke_device(settings.resolved_data_dir, device)
    except IdentityError as error:
        raise fail(f"identity error: {error.message}", 1) from error
    if previous is not None and previous.serial == revocations.serial:
        console.print(f"{device} was already revoked", highlight=False)
    console.print(
        f"revocation list serial {revocations.serial}: {len(revocations.revoked)} device(s) revoked",
        highlight=False,
    )
