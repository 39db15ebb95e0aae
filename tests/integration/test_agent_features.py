"""Working-set sampling, THP batches and CurveZMQ, for real."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.keys import generate_keypair, load_keypair
from tests.integration.conftest import MiB, start_agent, start_workload
from tests.integration.minihost import MiniHost

pytestmark = [pytest.mark.integration, pytest.mark.root]


def _ws_after_first_period(host: MiniHost) -> tuple[float, str]:
    host.pump(lambda: (s := host.last_status()) is not None and s.ws_touched_ratio is not None, 15,
              "a working-set sample")
    status = host.last_status()
    return status.ws_touched_ratio, status.ws_method


def test_working_set_tells_active_from_idle(make_cgroup, minihost, context):
    active = make_cgroup(512 * MiB, 256 * MiB)
    start_workload(active, "--size", "200MiB")
    start_agent(active, minihost, "busy", "--ws-period", "1s")
    busy_ratio, method = _ws_after_first_period(minihost)
    assert method == "referenced"
    assert 0.3 <= busy_ratio <= 0.5, f"200 of 512 MiB touched, measured {busy_ratio:.2f}"

    idle = make_cgroup(512 * MiB, 256 * MiB)
    other = MiniHost(context)
    try:
        start_workload(idle, "--size", "200MiB", "--idle")
        start_agent(idle, other, "sleepy", "--ws-period", "1s")
        idle_ratio, method = _ws_after_first_period(other)
    finally:
        other.close()
    assert method == "referenced"
    assert idle_ratio < 0.05, f"an idle 200 MiB set measured {idle_ratio:.2f}"


def test_huge_page_batches(make_cgroup, minihost):
    cgroup = make_cgroup(512 * MiB, 0)
    agent = start_agent(cgroup, minihost, "huge", "--huge-pages", "true", "--want-pfn", "false")
    minihost.pump(lambda: minihost.hellos, 10, "hello")
    assert minihost.hellos[0].supports_2m is True
    minihost.set_target("huge", 64 * 256)
    minihost.pump(lambda: (s := minihost.last_status()) is not None and s.balloon_pages == 64 * 256, 30, "64 MiB")
    rollup = Path(f"/proc/{agent.pid}/smaps_rollup").read_text()
    huge_kib = int(next(line.split()[1] for line in rollup.splitlines() if line.startswith("AnonHugePages:")))
    assert huge_kib >= 32 * 1024, f"only {huge_kib} KiB of the 64 MiB balloon is in 2 MiB pages"


def test_agent_registers_over_curve(make_cgroup, context, tmp_path):
    server_public, server_secret = generate_keypair(tmp_path, "host")
    _agent_public, agent_secret = generate_keypair(tmp_path, "agent")
    host = MiniHost(context, curve_secret_key=load_keypair(server_secret).secret_key)
    try:
        cgroup = make_cgroup(256 * MiB, 0)
        start_agent(cgroup, host, "secret", "--curve-server-public-key", str(server_public),
                    "--curve-client-key", str(agent_secret))
        host.pump(lambda: host.statuses, 10, "a status over CURVE")
        assert host.hellos[0].vm_id == "secret"
    finally:
        host.close()
