"""`balloonctl host sample_period=...` reaches agents that are already registered (protocol v4's
`settings` message), end to end: the balloonctl command line, a real hostd process, and
SimAgents on loopback. No root. The agent's side (AgentSession applying it) is
tests/unit/test_loopback_session.py's."""

from __future__ import annotations

import subprocess
import threading
import time

from protocol import Settings, Welcome
from tests.integration.hostd_proc import HostdProcess
from tests.integration.simagent import SimAgent

MiB = 1 << 20


def _ctl_while_reporting(hostd: HostdProcess, agents: list[SimAgent], *args: str) -> dict[str, list[int]]:
    """Run `balloonctl ARGS` (a process of its own: seconds of start-up) while the agents keep
    reporting, so none is lost meanwhile; then the sample periods each was pushed."""
    result: list[subprocess.CompletedProcess[str]] = []
    command = threading.Thread(target=lambda: result.append(hostd.ctl(*args)))
    command.start()
    pushed: dict[str, list[int]] = {agent.vm_id: [] for agent in agents}
    deadline = time.monotonic() + 1.0  # and a second more for the frames to arrive
    while command.is_alive() or time.monotonic() < deadline:
        if command.is_alive():
            deadline = time.monotonic() + 1.0
        for agent in agents:
            agent.status()
            pushed[agent.vm_id] += [m.sample_period_ms for m in agent.pump(50) if isinstance(m, Settings)]
        time.sleep(0.2)
    command.join()
    assert result and result[0].returncode == 0, result[0].stderr if result else "no result"
    return pushed


def test_a_host_sample_period_change_is_pushed_to_registered_agents(tmp_path):
    hostd = HostdProcess(tmp_path, "--sample-period", "60s")
    try:
        with SimAgent(hostd.agent_endpoint, "web", 256 * MiB) as web, \
                SimAgent(hostd.agent_endpoint, "db", 256 * MiB) as db:
            for agent in (web, db):
                welcome = agent.hello()
                assert isinstance(welcome, Welcome) and welcome.sample_period_ms == 60_000
                agent.status()
            pushed = _ctl_while_reporting(hostd, [web, db], "host", "sample_period=5s")
            assert pushed == {"web": [5_000], "db": [5_000]}
            # No setting an agent acts on: nothing pushed.
            assert _ctl_while_reporting(hostd, [web, db], "host", "idle_tax=0.5") == {"web": [], "db": []}
            with SimAgent(hostd.agent_endpoint, "late", 256 * MiB) as late:
                welcome = late.hello()
                assert isinstance(welcome, Welcome) and welcome.sample_period_ms == 5_000
            assert hostd.status()["host"]["sample_period_ms"] == 5_000
    finally:
        hostd.stop()
