"""Helpers of the v2 suite: the guest's cgroup-v2 facts, waits on conditions, stale leftovers."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lab import cgroups
from tests.conftest import require
from tests.integration.cgroups import memory_cgroup_version

MiB = 1 << 20
ROOT = Path("/sys/fs/cgroup")


def require_v2() -> None:
    require(memory_cgroup_version() == 2, "needs the unified cgroup hierarchy (the v2 guest)")
    require("memory" in (ROOT / "cgroup.subtree_control").read_text().split(),
            "needs the memory controller enabled for the root's children")


def remove_stale(name: str) -> None:
    """A cgroup left by an interrupted earlier run: killed and removed."""
    path = ROOT / name
    if path.exists():
        for frozen in path.rglob("cgroup.freeze"):
            frozen.write_text("0")
        cgroups.remove(path)


def wait(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.2) -> float:
    """Seconds until predicate() held; fails after timeout_s."""
    started = time.monotonic()
    while not predicate():
        waited = time.monotonic() - started
        assert waited < timeout_s, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(interval_s)
    return time.monotonic() - started


def mib(value: int | float | None) -> float:
    return round((value or 0) / MiB, 1)
