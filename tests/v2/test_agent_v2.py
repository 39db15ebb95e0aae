"""The agent on a real cgroup-v2 kernel (the v2 guest), against the minimal real host of the
integration tests: its own swap, no OOM kills, PSI-driven pressure deflate, kill -9."""

from __future__ import annotations

import signal
import time

import pytest

from protocol import stats_map
from tests.integration.cgroups import vm_locked_bytes
from tests.integration.conftest import pump_until_pinned_covers_ledger, read_event, start_agent, start_workload
from tests.v2.v2 import MiB, mib, require_v2, wait

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(600)]
PAGES_PER_MiB = MiB // 4096


@pytest.fixture(autouse=True)
def _v2() -> None:
    require_v2()


def _balloon_at(minihost, pages: int):
    return lambda: (s := minihost.last_status()) is not None and s.balloon_pages == pages


def test_inflating_pushes_the_workload_into_its_own_swap(make_cgroup, minihost, figures):
    cgroup = make_cgroup(256 * MiB, 512 * MiB)
    workload = start_workload(cgroup, "--size", "160MiB", "--idle")
    swap_before = int((cgroup.path / "memory.swap.current").read_text())
    started = time.monotonic()
    agent = start_agent(cgroup, minihost, "swapper")
    minihost.pump(lambda: minihost.hellos, 120, "hello")
    registered = time.monotonic() - started
    minihost.set_target("swapper", 128 * PAGES_PER_MiB)
    target_at = time.monotonic()
    minihost.pump(_balloon_at(minihost, 128 * PAGES_PER_MiB), 300, "balloon at 128 MiB")
    inflated = time.monotonic() - target_at
    assert len(minihost.ledger[b"swapper"]) == 128 * PAGES_PER_MiB
    assert pump_until_pinned_covers_ledger(minihost, agent, "swapper") >= 64 * MiB

    # The guest's own kernel chose: the idle workload's pages went to its swap (v2's counter).
    swap_now = int((cgroup.path / "memory.swap.current").read_text())
    swapped = swap_now - swap_before
    assert swapped == cgroup.swap_bytes() - swap_before  # the agent's reader says the same
    assert swapped >= 48 * MiB, f"only {swapped >> 20} MiB went to swap"
    assert cgroup.oom_kills() == 0

    # Re-touching them costs major faults.
    faults_before = cgroup.major_faults()
    workload.send_signal(signal.SIGUSR1)
    read_event(workload, "retouched")
    major_faults = cgroup.major_faults() - faults_before
    assert major_faults >= 500, f"re-touching swapped memory caused only {major_faults} major faults"

    minihost.set_target("swapper", 0)
    minihost.pump(_balloon_at(minihost, 0), 120, "balloon at 0")
    wait(lambda: vm_locked_bytes(agent.pid) == 0, 30, "VmLck 0")
    # Pumped, not read once: after a re-hello (a reply later than 2 host timeouts under TCG) the
    # unlocks of pages freed meanwhile are sent again once the welcome came, a round trip after
    # the status that said 0 (seen: the full lane at host load ~10, 2026-12-01).
    minihost.pump(lambda: minihost.ledger[b"swapper"] == set(), 120, "the ledger empty")
    figures.update(registered_s=round(registered, 1), inflate_128MiB_s=round(inflated, 1), balloon_MiB=128,
                   swap_rise_MiB=mib(swapped), major_faults_on_retouch=major_faults, oom_kills=cgroup.oom_kills())
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=60) == 0
    minihost.pump(lambda: minihost.byes, 30, "bye")


def test_growing_workload_without_swap_is_never_oom_killed(make_cgroup, minihost, figures):
    cgroup = make_cgroup(256 * MiB, 0)
    workload = start_workload(cgroup, "--size", "32MiB", "--grow-to", "176MiB", "--grow-rate", "16MiB", "--idle")
    agent = start_agent(cgroup, minihost, "noswap")
    minihost.pump(lambda: minihost.hellos, 120, "hello")
    minihost.set_target("noswap", 192 * PAGES_PER_MiB)  # more than the guest can ever give

    def grown() -> bool:  # the workload's own anon: the balloon's pinned pages are anon too
        last = minihost.last_status() if minihost.statuses else None
        balloon_bytes = last.balloon_pages * 4096 if last is not None else 0
        return cgroup.stat().get("anon", 0) - balloon_bytes >= 170 * MiB

    minihost.pump(grown, 300, "the workload to grow to 176 MiB")
    # ...and a few more reports at the full size while the balloon is still asked for 192 MiB
    seen = len(minihost.statuses)
    minihost.pump(lambda: len(minihost.statuses) >= seen + 10, 120, "ten more statuses")
    status = minihost.last_status()
    assert workload.poll() is None, "workload died"
    assert agent.poll() is None, "agent died"
    assert cgroup.oom_kills() == 0
    assert status.balloon_pages < 192 * PAGES_PER_MiB  # the balloon yielded
    deflates = minihost.stat("pressure_deflates")
    assert deflates >= 1 or status.agent_state == "refusing"
    assert status.balloon_pages * 4096 + 170 * MiB <= 256 * MiB
    peak = max(s.balloon_pages for s in minihost.statuses)
    figures.update(balloon_peak_MiB=mib(peak * 4096), balloon_at_end_MiB=mib(status.balloon_pages * 4096),
                   pressure_deflates=deflates, agent_state=status.agent_state, oom_kills=cgroup.oom_kills())


def test_pressure_deflate_happens_and_is_reported_with_the_guests_psi(make_cgroup, minihost, figures):
    """A balloon asked for more than an idle guest can spare without stalling: the agent's own
    pinning drives the cgroup into reclaim, the kernel's PSI for the cgroup (memory.pressure,
    v2 only) shows tasks stalled, and the agent deflates at once, says why, and reports the
    guest's PSI to the host. Which signal fires first, PSI full ≥ 10 % or the anonymous
    refaults of thrashing, is the kernel's timing: both count, the reason is recorded."""
    cgroup = make_cgroup(256 * MiB, 512 * MiB)
    start_workload(cgroup, "--size", "180MiB", "--idle")
    agent = start_agent(cgroup, minihost, "pressed")
    minihost.pump(lambda: minihost.hellos, 120, "hello")
    log_path = cgroup.logs[-1]
    minihost.set_target("pressed", 224 * PAGES_PER_MiB)  # far more than it can spare at once
    started = time.monotonic()
    minihost.pump(lambda: "pages at once: " in log_path.read_text(), 300, "a pressure deflate")
    took = time.monotonic() - started
    assert cgroup.oom_kills() == 0 and agent.poll() is None
    # Reported: the host sees the count and the guest's PSI (None on v1) in the status stats.
    seen = len(minihost.statuses)
    minihost.pump(lambda: len(minihost.statuses) >= seen + 5, 60, "five more statuses")
    keys = minihost.hellos[-1].stats_keys
    psi_full = [stats_map(keys, s.stats)["psi_full_avg10"] for s in minihost.statuses]
    assert all(value is not None for value in psi_full), "a status without the guest's PSI"
    assert minihost.stat("pressure_deflates") >= 1
    pressure = (cgroup.path / "memory.pressure").read_text()
    full_total_us = int(pressure.splitlines()[1].split()[4].split("=")[1])
    assert full_total_us > 0, pressure  # the kernel's PSI saw the stall
    reasons = [line.split("at once: ", 1)[1].split(";")[0] for line in log_path.read_text().splitlines()
               if "pages at once: " in line]
    peak = max(s.balloon_pages for s in minihost.statuses)
    figures.update(pressure_deflate_after_s=round(took, 1), reasons=reasons[:4],
                   psi_driven=any(r.startswith("PSI") for r in reasons),
                   psi_full_avg10_max_reported=max(psi_full), psi_full_total_ms=full_total_us // 1000,
                   pressure_deflates=minihost.stat("pressure_deflates"), balloon_peak_MiB=mib(peak * 4096),
                   oom_kills=cgroup.oom_kills())


def test_kill_9_of_the_agent_frees_the_balloon(make_cgroup, minihost, figures):
    cgroup = make_cgroup(256 * MiB, 256 * MiB)
    agent = start_agent(cgroup, minihost, "victim")
    minihost.pump(lambda: minihost.hellos, 120, "hello")
    minihost.set_target("victim", 128 * PAGES_PER_MiB)
    minihost.pump(_balloon_at(minihost, 128 * PAGES_PER_MiB), 300, "balloon at 128 MiB")
    usage_inflated = cgroup.usage_bytes()
    agent.kill()
    agent.wait(timeout=30)
    freed_in = wait(lambda: usage_inflated - cgroup.usage_bytes() >= 120 * MiB, 60, "usage to drop by the balloon")
    figures.update(usage_inflated_MiB=mib(usage_inflated), usage_after_kill_MiB=mib(cgroup.usage_bytes()),
                   freed_within_s=round(freed_in, 1))
