"""Receipts settled per second (verify both signatures, persist, move balances) on SQLite and PostgreSQL,
next to the raw Ed25519 verify rate of this machine measured in the same run.

    .venv/bin/python bench/ledger.py [--receipts 4000] [--batch 200] [--no-postgres]

Target: settlement at least 0.5 of the raw rate of two verifies per receipt.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mycellm.identity.certificates import DeviceCertificate
from mycellm.ledger.audit import audit
from mycellm.ledger.credits import CreditBook
from mycellm.ledger.pricing import PriceSettings, PriceTable
from mycellm.ledger.receipts import Receipt, ReceiptTerms
from mycellm.ledger.store import Store
from mycellm.types import AccountId
from tests.ledger_kit import make_receipt, parties

NETWORK = "bench-network"
PRICES = PriceTable(PriceSettings(initial_grant=1_000_000.0))


def raw_verify_rate(receipts: list[Receipt], seconds: float = 2.0) -> float:
    """Ed25519 verifies per second on receipt-sized payloads (the consumer's signature)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from mycellm.identity.certificates import DeviceCertificate
    from mycellm.ledger.receipts import ReceiptTerms

    samples = []
    for receipt in receipts[:64]:
        terms = ReceiptTerms.from_bytes(receipt.terms)
        key = Ed25519PublicKey.from_public_bytes(
            DeviceCertificate.from_bytes(terms.consumer).device_public_key
        )
        samples.append((key, receipt.consumer_signature, receipt.terms))
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for key, signature, payload in samples:
            key.verify(signature, payload)
        count += len(samples)
    return count / (time.perf_counter() - started)


async def settle_rate(url: str, receipts: list[Receipt], batch: int, in_flight: int) -> tuple[float, bool]:
    store = await Store.open(url)
    try:
        book = CreditBook(store.engine, PRICES, NETWORK)
        gate = asyncio.Semaphore(in_flight)
        # Members get their grant when they join (an account only seen in receipts gets none).
        consumers = {ReceiptTerms.from_bytes(receipt.terms).consumer for receipt in receipts}
        for consumer in consumers:
            await book.join(AccountId(DeviceCertificate.from_bytes(consumer).account_id))

        async def settle(part: list[Receipt]) -> None:
            async with gate:
                outcomes = await book.settle_many(part)
            assert not any(isinstance(outcome, Exception) for outcome in outcomes), outcomes[:3]

        started = time.perf_counter()
        # Several batches in flight, as a Ledger serving many requests sees them: one batch's
        # signatures are checked while another's transaction waits on the database.
        await asyncio.gather(
            *(settle(receipts[start : start + batch]) for start in range(0, len(receipts), batch))
        )
        elapsed = time.perf_counter() - started
        report = await audit(store.engine, PRICES, NETWORK)
        return len(receipts) / elapsed, report.ok and report.receipts == len(receipts)
    finally:
        await store.close()


def _signed_rounds(root: Path, count: int, rounds: int) -> list[list[Receipt]]:
    """``rounds`` sets of ``count`` receipts among four parties, every fifth with a relay; each
    consumer's receipts carry its spend chain (number, held before, hold), as paid requests do."""
    people = list(parties(root, "a", "b", "c", "d").values())
    chains = [[1, 0] for _ in people]  # each consumer's next number and what its holds took
    hold_price = 10**6

    def chained(consumer: int) -> tuple[int, int, int]:
        seq, held = chains[consumer]
        chains[consumer] = [seq + 1, held + hold_price]
        return seq, held, hold_price

    return [
        [
            make_receipt(
                PRICES,
                people[index % 4],
                people[(index + 1) % 4],
                f"r{round_}-{index}",
                relays=(people[(index + 2) % 4],) if index % 5 == 0 else (),
                network_id=NETWORK,
                hold=chained(index % 4),
            )
            for index in range(count)
        ]
        for round_ in range(rounds)
    ]


def _report(options: argparse.Namespace, raw: list[float], results: dict[str, list[float]]) -> None:
    verify = statistics.median(raw)
    budget = verify / 2  # two signatures per receipt
    print(
        f"\n{options.receipts} receipts x {options.rounds} rounds, batches of {options.batch} ({options.in_flight} in flight), "
        f"cores {os.cpu_count()}, load {os.getloadavg()[0]:.1f}"
    )
    print(f"{'metric':34} {'median':>10} {'ratio to raw/2':>15}  target")
    print("-" * 72)
    print(f"{'raw Ed25519 verifies/s':34} {verify:10.0f}")
    print(f"{'raw receipts/s (2 verifies each)':34} {budget:10.0f} {1.0:15.3f}")
    for backend, rates in results.items():
        if rates:
            rate = statistics.median(rates)
            verdict = "ok" if rate >= 0.5 * budget else "MISSED"
            print(
                f"{'settled receipts/s ' + backend:34} {rate:10.0f} {rate / budget:15.3f}  >= 0.5 {verdict}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--receipts", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=3, help="batches settling at once")
    parser.add_argument("--no-postgres", action="store_true")
    options = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="mycellm-bench-ledger-"))
    print(f"signing {options.receipts * options.rounds} receipts ...", flush=True)
    rounds = _signed_rounds(root, options.receipts, options.rounds)
    server = None
    if not options.no_postgres:
        from tests.postgres import PostgresServer

        server = PostgresServer.start()
    results: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
    raw: list[float] = []
    try:
        for index, receipts in enumerate(rounds):
            raw.append(raw_verify_rate(receipts))
            rate, ok = asyncio.run(
                settle_rate(
                    f"sqlite+aiosqlite:///{root / f'ledger-{index}.db'}",
                    receipts,
                    options.batch,
                    options.in_flight,
                )
            )
            assert ok, "the SQLite books do not balance"
            results["sqlite"].append(rate)
            if server is not None:
                url = server.url(server.create_database(f"bench_{index}"))
                rate, ok = asyncio.run(settle_rate(url, receipts, options.batch, options.in_flight))
                assert ok, "the PostgreSQL books do not balance"
                results["postgresql"].append(rate)
    finally:
        if server is not None:
            server.stop()
    _report(options, raw, results)


if __name__ == "__main__":
    main()
