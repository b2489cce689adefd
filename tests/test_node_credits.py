"""The credit interfaces: /v1/node/credits and /v1/node/receipts on a node, `mycellm ledger audit` offline."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from mycellm.config import NodeSettings, PriceSettings
from mycellm.federation.held import create_default_network
from mycellm.identity.keys import load_or_create_identity
from mycellm.ledger.credits import CreditBook
from mycellm.ledger.pricing import PriceTable
from mycellm.ledger.store import Store
from tests.ledger_kit import make_receipt, parties


@pytest.mark.node
def test_a_fresh_node_shows_its_grant_and_no_receipts(node) -> None:
    credits = httpx.get(f"{node.url}/v1/node/credits", timeout=10).json()
    status = httpx.get(f"{node.url}/v1/node/status", timeout=10).json()
    # The books are those of the node's default network, the one a bare node creates: id = account id.
    assert credits["account_id"] == status["account_id"] == credits["network_id"]
    # The node's own account is a member of the network it holds: granted once, the only transfer.
    assert credits["balance"] == credits["initial_grant"] == 100.0
    assert [transfer["kind"] for transfer in credits["transfers"]] == ["grant"]
    receipts = httpx.get(
        f"{node.url}/v1/node/receipts", params={"limit": 5, "role": "seeder"}, timeout=10
    ).json()
    assert receipts == {"object": "list", "data": [], "limit": 5, "offset": 0}


@pytest.mark.node
@pytest.mark.parametrize(
    ("path", "params", "param"),
    [
        ("/v1/node/credits", {"account": "not-an-account"}, "account"),
        ("/v1/node/credits", {"limit": 0}, "limit"),
        ("/v1/node/receipts", {"limit": 5000}, "limit"),
        ("/v1/node/receipts", {"offset": -1}, "offset"),
        ("/v1/node/receipts", {"role": "thief"}, "role"),
        ("/v1/node/receipts", {"account": "A" * 64}, "account"),
    ],
)
def test_bad_credit_queries_get_a_clear_400(node, path: str, params: dict[str, object], param: str) -> None:
    response = httpx.get(f"{node.url}{path}", params=params, timeout=10)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    environment = {name: value for name, value in os.environ.items() if not name.startswith("MYCELLM_")}
    environment.update(HOME=str(home), COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "mycellm", *args], capture_output=True, text=True, timeout=120, env=environment
    )


def test_ledger_audit_passes_clean_books_and_fails_tampered_ones(tmp_path: Path) -> None:
    data_dir = tmp_path / "node"
    people = parties(tmp_path, "alice", "bob")
    prices = PriceTable(PriceSettings())
    identity = load_or_create_identity(data_dir, node_name="node")
    network = create_default_network(NodeSettings(data_dir=data_dir, models=()), identity)
    assert network is not None and network.network_id == identity.account_id

    async def fill(tamper: bool) -> None:
        store = await Store.open(f"sqlite+aiosqlite:///{data_dir / 'mycellm.db'}")
        try:
            if tamper:
                async with store.engine.begin() as connection:
                    await connection.execute(text("UPDATE credit_accounts SET balance = balance + 1"))
                return
            book = CreditBook(store.engine, prices, network.network_id)
            await book.join(people["alice"].account_id)  # a proven member: granted once
            await book.join(people["bob"].account_id)
            for index in range(3):
                await book.settle(
                    make_receipt(
                        prices, people["alice"], people["bob"], f"q-{index}", network_id=network.network_id
                    )
                )
        finally:
            await store.close()

    asyncio.run(fill(tamper=False))
    clean = _cli("ledger", "audit", "--data-dir", str(data_dir), home=tmp_path)
    assert clean.returncode == 0, clean.stderr
    assert "3 receipts, 2 accounts" in clean.stdout and "ok:" in clean.stdout
    asyncio.run(fill(tamper=True))
    tampered = _cli("ledger", "audit", "--data-dir", str(data_dir), home=tmp_path)
    assert tampered.returncode == 1
    assert "mismatch: account" in tampered.stderr and "was issued" in tampered.stderr
