"""CPU seconds of a node's processes, by kind (the engine's worker, the ingress, Serve's proxy and
controller, Ray's GCS and raylet, the dashboard...), read from /proc, for benchmarks."""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.nodes import session_pids

TICK = os.sysconf("SC_CLK_TCK")


def _kind(pid: int) -> str:
    """A short name for what the process is, from its command line (Ray titles its workers)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    first = argv[0].decode(errors="replace") if argv and argv[0] else ""
    if first.startswith("ray::"):
        title = first.split()[0].removeprefix("ray::")
        if title.startswith("ServeReplica"):
            return "ingress (Serve replica)"
        return title.split(".")[0]
    words = [word.decode(errors="replace") for word in argv if word]
    scripts = [Path(word).name for word in words[1:] if word.endswith(".py")]
    if "mycellm" in words[1:3]:
        return "driver (mycellm serve)"
    return scripts[0] if scripts else Path(first).name or "?"


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def group_pids(root: int) -> list[int]:
    """``root`` and every live process of its session (a node and all its Ray processes)."""
    return [root, *(pid for pid in session_pids(root) if pid != root)]


def cpu_by_kind(root: int) -> Counter[str]:
    """CPU seconds used so far by each kind of process of ``root``'s session."""
    used: Counter[str] = Counter()
    for pid in group_pids(root):
        used[_kind(pid)] += cpu_seconds(pid)
    return used


def since(before: Counter[str], after: Counter[str]) -> Counter[str]:
    """What each kind used between two readings (a process that ended meanwhile counts zero)."""
    return Counter({kind: max(0.0, after[kind] - before.get(kind, 0.0)) for kind in after})
