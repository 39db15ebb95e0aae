"""Agent lifecycle against real sockets: host restart adoption, host gone, no mlock permission."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import require
from tests.integration.cgroups import vm_locked_bytes
from tests.integration.conftest import MiB, start_agent
from tests.integration.minihost import MiniHost

pytestmark = [pytest.mark.integration, pytest.mark.root]
PAGES_PER_MiB = MiB // 4096
ROOT = Path(__file__).resolve().parents[2]


def test_restarted_host_adopts_the_balloon_without_double_inflation(make_cgroup, context):
    cgroup = make_cgroup(512 * MiB, 512 * MiB)
    first = MiniHost(context, session_id="first")
    agent = start_agent(cgroup, first, "adoptee")
    first.pump(lambda: first.hellos, 10, "hello")
    first.set_target("adoptee", 64 * PAGES_PER_MiB)
    first.pump(lambda: (s := first.last_status()) is not None and s.balloon_pages == 64 * PAGES_PER_MiB,
               30, "balloon at 64 MiB")
    locked_before = vm_locked_bytes(agent.pid)
    port = first.port
    first.close()  # the host "crashes"

    second = MiniHost(context, session_id="second", port=port)
    try:
        second.pump(lambda: second.hellos, 20, "re-registration")
        hello = second.hellos[-1]
        assert hello.held_pages == 64 * PAGES_PER_MiB
        assert hello.last_host_session_id == "first"
        second.pump(lambda: len(second.ledger.get(b"adoptee", ())) == 64 * PAGES_PER_MiB, 10, "adoption")
        second.pump(lambda: len(second.statuses) >= 5, 10, "a few reports")
        assert second.last_status().balloon_pages == 64 * PAGES_PER_MiB
        assert vm_locked_bytes(agent.pid) == locked_before  # nothing inflated twice
        assert agent.poll() is None
    finally:
        second.close()


def test_host_gone_past_grace_deflates_gradually(make_cgroup, context):
    cgroup = make_cgroup(512 * MiB, 512 * MiB)
    host = MiniHost(context)
    agent = start_agent(cgroup, host, "orphan", "--host-grace", "1s")
    host.pump(lambda: host.hellos, 10, "hello")
    host.set_target("orphan", 128 * PAGES_PER_MiB)
    host.pump(lambda: (s := host.last_status()) is not None and s.balloon_pages == 128 * PAGES_PER_MiB,
              30, "balloon at 128 MiB")
    # A host that never answers statuses is still there: its connection is up (no re-hello).
    quiet_until = time.monotonic() + 2.0  # twice the agent's host timeout (5 × 200 ms)
    host.pump(lambda: time.monotonic() > quiet_until, 5, "a quiet host")
    assert len(host.hellos) == 1
    host.close()
    gone_at = time.monotonic()
    samples = []
    deadline = gone_at + 20
    while vm_locked_bytes(agent.pid) > 0:
        assert time.monotonic() < deadline, "balloon not released after the host disappeared"
        samples.append(vm_locked_bytes(agent.pid))
        time.sleep(0.1)
    elapsed = time.monotonic() - gone_at
    assert elapsed >= 1.0 + 1.0  # host timeout (5 × 200 ms) + grace (1 s) before anything is released
    assert len({s for s in samples if 0 < s < 128 * MiB}) >= 2, "released all at once, not gradually"
    assert agent.poll() is None


def test_pinning_without_ipc_lock_says_how_to_fix_it():
    require(os.geteuid() == 0 and shutil.which("setpriv") is not None, "needs root and setpriv to drop CAP_IPC_LOCK")
    code = (
        "from guestagent.balloon import Pinner\n"
        "from guestagent.errors import PinError\n"
        "p = Pinner(1024)\n"
        "try:\n    p.pin(512)\nexcept PinError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        ["setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock", "prlimit", "--memlock=65536:65536",
         sys.executable, "-c", code],
        capture_output=True, text=True, timeout=30, cwd=ROOT, check=True,
    )
    assert "CAP_IPC_LOCK" in out.stdout and "IPC_LOCK" in out.stdout and "64 KiB" in out.stdout
