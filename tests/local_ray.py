"""A Ray of this process alone for tests that drive actors directly: loopback, no dashboard, a
short temp dir of its own (Ray's socket paths have a length limit)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

import ray


@contextlib.contextmanager
def ray_session(num_cpus: int = 2) -> Iterator[None]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        "local",
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        num_cpus=num_cpus,
        log_to_driver=False,
        _temp_dir=tempfile.mkdtemp(prefix="mcray", dir="/tmp"),
    )
    try:
        yield
    finally:
        ray.shutdown()
