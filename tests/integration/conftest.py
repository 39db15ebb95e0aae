from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from tests.conftest import require, require_root, require_swap
from tests.integration.cgroups import TestCgroup, memory_cgroup_version
from tests.integration.minihost import MiniHost

MiB = 1 << 20


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def minihost(context) -> Iterator[MiniHost]:
    host = MiniHost(context)
    yield host
    host.close()


@pytest.fixture
def make_cgroup() -> Iterator:
    require_root()
    require(memory_cgroup_version() is not None, "needs a mounted memory cgroup controller")
    made: list[TestCgroup] = []

    def factory(limit_bytes: int, swap_bytes: int) -> TestCgroup:
        if swap_bytes:
            require_swap(swap_bytes)
        cgroup = TestCgroup(limit_bytes, swap_bytes)
        made.append(cgroup)
        return cgroup

    yield factory
    for cgroup in made:
        cgroup.destroy()
        for log_path in cgroup.logs:
            print(f"--- {log_path.name} ---\n{log_path.read_text()[-6000:]}")


def start_agent(cgroup: TestCgroup, host: MiniHost, vm_id: str, *extra: str) -> subprocess.Popen[str]:
    """The agent's log goes to a file next to the test's temporary files and is printed at
    the end of the test (pytest shows it on failure)."""
    log_path = Path(tempfile.mkdtemp(prefix="balloonlab-agent-")) / f"{vm_id}.log"
    cgroup.logs.append(log_path)
    with open(log_path, "w") as log_file:
        return cgroup.python("-m", "guestagent", "--vm-id", vm_id, "--host-endpoint", host.endpoint,
                             "--cgroup-path", str(cgroup.path), "--report-interval", "200ms", "--log-level", "INFO",
                             *extra, stderr=log_file)


def start_workload(cgroup: TestCgroup, *args: str) -> subprocess.Popen[str]:
    process = cgroup.python("-m", "guestagent.workload", *args, stdout=subprocess.PIPE)
    line = process.stdout.readline()
    assert json.loads(line)["event"] == "ready", line
    return process


def pump_until_pinned_covers_ledger(host: MiniHost, agent: subprocess.Popen[str], vm_id: str,
                                    timeout_s: float = 30.0) -> int:
    """Every page in hostd's ledger is really locked in the agent (VmLck), checked until it holds.

    One read of each is a race: a pressure deflate may munlock pages after the status that
    showed the full balloon and before VmLck is read, and its unlock frames reach the host
    only afterwards (CI saw 123.4 of 128 MiB locked that way). The release munlocks before it
    reports, so pumping those frames in makes the two agree; returns the ledger's size in bytes."""
    from tests.integration.cgroups import vm_locked_bytes
    ledger = host.ledger[vm_id.encode()]
    host.pump(lambda: vm_locked_bytes(agent.pid) >= len(ledger) * 4096, timeout_s,
              f"{vm_id}'s VmLck to cover its {len(ledger)}-page ledger")
    return len(ledger) * 4096


def read_event(process: subprocess.Popen[str], event: str, max_lines: int = 100) -> dict:
    for _ in range(max_lines):
        line = process.stdout.readline()
        if not line:
            break
        record = json.loads(line)
        if record["event"] == event:
            return record
    raise AssertionError(f"workload never reported {event!r}")


__all__ = ["MiB", "pump_until_pinned_covers_ledger", "read_event", "start_agent", "start_workload", "sys"]
