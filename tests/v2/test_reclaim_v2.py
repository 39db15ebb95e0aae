"""hostd's reclaim mode on a real cgroup-v2 kernel (the v2 guest): the agent hands each batch
of its balloon back (munlock + MADV_DONTNEED) once hostd has the pages in its ledger, and
hostd lowers the guest's `memory.max` by the balloon at once (a 64 MiB step a second), so the
guest cannot take that memory back and the host really has it; deflating raises the limit
again, and hostd's exit restores the guest's own. hostd changes `memory.max` only:
`memory.high` stays the guest's own ("max"), and nothing in the guest is throttled or killed."""

from __future__ import annotations

import signal
import time

import pytest

from hostd.cgroupfs import CgroupfsBackend
from tests.integration.cgroups import vm_locked_bytes
from tests.integration.conftest import start_workload
from tests.integration.hostd_proc import vm
from tests.v2.hostd_v2 import SlowHostd
from tests.v2.v2 import MiB, mib, require_v2, wait

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.swap, pytest.mark.timeout(600)]
PAGES_PER_MiB = MiB // 4096
OWN_MiB = 512
BALLOON_MiB = 192


def _events(path) -> dict[str, int]:
    return {key: int(value) for key, value in (line.split() for line in path.read_text().splitlines())}


def test_reclaim_mode_lowers_memory_max_by_the_balloon_and_hands_its_memory_back(make_cgroup, tmp_path, figures):
    require_v2()
    cgroup = make_cgroup(OWN_MiB * MiB, OWN_MiB * MiB)
    start_workload(cgroup, "--phases", "grow to 96MiB at 256MiB/s, idle")
    name = cgroup.path.name
    backend = CgroupfsBackend()
    config = tmp_path / "hostd.toml"
    config.write_text(f'[vms.rec]\ncgroup = "{name}"\n')
    hostd = SlowHostd(tmp_path, "--config", str(config), "--vswap-state-file", str(tmp_path / "vswap.json"),
                      "--host-memory", "8GiB", "--report-interval", "500ms", "--reclaim-mode", "true")
    agent = None
    try:
        with (tmp_path / "agent.log").open("w") as log:
            agent = cgroup.python("-m", "guestagent", "--vm-id", "rec", "--host-endpoint", hostd.agent_endpoint,
                                  "--cgroup-path", str(cgroup.path), "--report-interval", "500ms",
                                  "--want-pfn", "false", stderr=log)  # reclaim mode needs VPNs
        started = time.monotonic()
        hostd.wait_until(lambda s: any(v["vm_id"] == "rec" and v["alive"] for v in s["vms"]), 120, "the agent")
        registered = time.monotonic() - started
        time.sleep(2)
        usage_before = cgroup.usage_bytes()
        assert backend.limit_bytes(name) == OWN_MiB * MiB
        hostd.client.target("rec", BALLOON_MiB * PAGES_PER_MiB)
        target_at = time.monotonic()
        hostd.wait_until(lambda s: vm(s, "rec")["balloon_bytes"] == BALLOON_MiB * MiB, 300,
                                    f"the balloon at {BALLOON_MiB} MiB")
        inflated = time.monotonic() - target_at
        lowered = wait(lambda: backend.limit_bytes(name) == (OWN_MiB - BALLOON_MiB) * MiB, 120,
                       f"memory.max lowered by the balloon to {OWN_MiB - BALLOON_MiB} MiB")
        time.sleep(2)
        usage_inflated = cgroup.usage_bytes()
        grew = usage_inflated - usage_before
        memory_high = (cgroup.path / "memory.high").read_text().strip()
        locked = vm_locked_bytes(agent.pid)
        rec = vm(hostd.status(), "rec")
        # The balloon's memory is the host's: not charged to the guest, not pinned, and the
        # guest's ceiling is its own limit less the balloon.
        assert (cgroup.path / "memory.max").read_text().strip() == str((OWN_MiB - BALLOON_MiB) * MiB)
        assert grew <= 32 * MiB, f"the guest's cgroup grew {grew >> 20} MiB with the balloon handed back"
        assert locked <= 8 * MiB, f"the agent still pins {locked >> 20} MiB"
        assert memory_high == "max"  # hostd uses memory.max only
        assert rec["has_agent"] and rec["ledger_bytes"] >= BALLOON_MiB * MiB  # hostd's ledger has the pages
        assert rec["vswap_reason"].startswith("reclaim:"), rec["vswap_reason"]
        assert rec["vswap_limit_bytes"] == (OWN_MiB - BALLOON_MiB) * MiB

        # Deflating gives the limit back as the balloon shrinks.
        hostd.client.target("rec", 0)
        deflated = wait(lambda: backend.limit_bytes(name) == OWN_MiB * MiB, 180,
                        "memory.max back at the guest's own limit after the deflate")
        events = _events(cgroup.path / "memory.events")
        assert events["oom_kill"] == 0 and events["high"] == 0, events
        figures.update(registered_s=round(registered, 1), balloon_MiB=BALLOON_MiB, inflate_s=round(inflated, 1),
                       memory_max_own_MiB=OWN_MiB, memory_max_lowered_MiB=mib(OWN_MiB * MiB - BALLOON_MiB * MiB),
                       lowered_within_s=round(lowered, 1), cgroup_grew_MiB=mib(grew), agent_vmlck_MiB=mib(locked),
                       memory_high=memory_high, vswap_reason=rec["vswap_reason"],
                       limit_back_after_deflate_s=round(deflated, 1), oom_kills=events["oom_kill"],
                       high_events=events["high"])
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=120) == 0
        agent = None
    finally:
        if agent is not None:
            agent.kill()
        hostd.stop()
    assert backend.limit_bytes(name) == OWN_MiB * MiB  # the guest's own limit, at hostd's exit too

