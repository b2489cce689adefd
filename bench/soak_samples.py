"""What ``bench/soak.py`` samples of one node: its session's fds, memory and threads, its logs, and
what it says over HTTP (requests in flight, peers)."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import httpx

from tests.nodes import NodeProcess, session_pids


def _proc_status(pid: int) -> tuple[int, int, int]:
    """(open fds, RSS kB, threads) of one process; zeros if it is gone."""
    try:
        fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
        )
        rss = int(fields.get("VmRSS", "0 kB").split()[0])
        return fds, rss, int(fields["Threads"])
    except (OSError, KeyError, ValueError):
        return 0, 0, 0


def log_mib(node: NodeProcess) -> float:
    """MiB of a node's logs: its own and its Ray session's (where its actors' warnings go)."""
    assert node.process is not None
    total = node.log_path.stat().st_size
    with contextlib.suppress(OSError, StopIteration):
        environ = Path(f"/proc/{node.process.pid}/environ").read_bytes().split(b"\0")
        temp = next(item[21:].decode() for item in environ if item.startswith(b"MYCELLM_RAY_TEMP_DIR="))
        logs = Path(temp) / "session_latest" / "logs"
        total += sum(path.stat().st_size for path in logs.rglob("*") if path.is_file())
    return total / 2**20


def sample(node: NodeProcess) -> dict[str, Any]:
    """What one node's session holds now, and what it says over HTTP."""
    assert node.process is not None
    pids = {node.process.pid, *session_pids(node.process.pid)}
    fds, rss, threads = (sum(values) for values in zip(*(_proc_status(pid) for pid in pids), strict=True))
    row: dict[str, Any] = {
        "fds": fds,
        "rss_mib": rss / 1024,
        "threads": threads,
        "logs_mib": f"{log_mib(node):.1f}",
    }
    row.update(in_flight="?", peers="?", inbound="?", inbound_peak=0)
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
        metrics = httpx.get(f"{node.url}/metrics", timeout=10).text
        found = re.search(r"^mycellm_requests_in_flight (\S+)$", metrics, flags=re.MULTILINE)
        row["in_flight"] = int(float(found.group(1))) if found else "?"
        peers = httpx.get(f"{node.url}/v1/node/peers", timeout=10).json()
        row["peers"] = f"{len(peers['connected'])}/{len(peers['data'])}"
        links = peers["links"]  # the node's own count of the links it holds
        row["inbound"], row["inbound_peak"] = (
            f"{links['inbound']}/{links['inbound_peak']}",
            links["inbound_peak"],
        )
    return row
