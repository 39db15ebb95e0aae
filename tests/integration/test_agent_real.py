"""The agent in a real memory cgroup with real swap, against a minimal real ROUTER host."""

from __future__ import annotations

import signal
import time

import pytest

from tests.integration.cgroups import vm_locked_bytes
from tests.integration.conftest import MiB, pump_until_pinned_covers_ledger, read_event, start_agent, start_workload

pytestmark = [pytest.mark.integration, pytest.mark.root]

PAGES_PER_MiB = MiB // 4096


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_balloon_pushes_workload_into_its_own_swap(make_cgroup, minihost):
    cgroup = make_cgroup(512 * MiB, 1024 * MiB)
    workload = start_workload(cgroup, "--size", "400MiB", "--idle")
    swap_before = cgroup.swap_bytes()
    agent = start_agent(cgroup, minihost, "swapper")
    minihost.pump(lambda: minihost.hellos, 10, "hello")
    minihost.set_target("swapper", 256 * PAGES_PER_MiB)
    minihost.pump(lambda: (s := minihost.last_status()) is not None and s.balloon_pages == 256 * PAGES_PER_MiB,
                  90, "balloon at 256 MiB")
    assert len(minihost.ledger[b"swapper"]) == 256 * PAGES_PER_MiB
    assert pump_until_pinned_covers_ledger(minihost, agent, "swapper") >= 128 * MiB

    # The guest's own kernel chose: the idle workload's pages went to the guest's swap.
    swapped = cgroup.swap_bytes() - swap_before
    assert swapped >= 100 * MiB, f"only {swapped >> 20} MiB went to swap"
    assert cgroup.oom_kills() == 0

    # Re-touching them costs major faults.
    faults_before = cgroup.major_faults()
    workload.send_signal(signal.SIGUSR1)
    read_event(workload, "retouched")
    major_faults = cgroup.major_faults() - faults_before
    assert major_faults >= 1000, f"re-touching swapped memory caused only {major_faults} major faults"

    # Deflate to zero: the balloon's pages are gone.
    usage_inflated = cgroup.usage_bytes()
    minihost.set_target("swapper", 0)
    minihost.pump(lambda: minihost.last_status().balloon_pages == 0, 30, "balloon at 0")
    _wait(lambda: vm_locked_bytes(agent.pid) == 0, 5, "VmLck 0")
    # The memory comes back first; the unlocks that report it follow (the host answers them).
    minihost.pump(lambda: minihost.ledger[b"swapper"] == set(), 10, "the ledger empty")
    assert cgroup.usage_bytes() < usage_inflated
    assert workload.poll() is None and agent.poll() is None

    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=10) == 0
    minihost.pump(lambda: minihost.byes, 5, "bye")


def test_no_swap_guest_with_growing_workload_never_oom_killed(make_cgroup, minihost):
    cgroup = make_cgroup(512 * MiB, 0)
    workload = start_workload(cgroup, "--size", "64MiB", "--grow-to", "400MiB", "--grow-rate", "48MiB", "--idle")
    agent = start_agent(cgroup, minihost, "noswap")
    minihost.pump(lambda: minihost.hellos, 10, "hello")
    minihost.set_target("noswap", 384 * PAGES_PER_MiB)  # more than the guest can ever give
    # Let the workload grow to 400 MiB and settle while the balloon is asked to stay at 384 MiB.
    deadline = time.monotonic() + 14
    minihost.pump(lambda: time.monotonic() > deadline, 20, "the growth phase")
    status = minihost.last_status()
    assert workload.poll() is None, "workload died"
    assert agent.poll() is None, "agent died"
    assert cgroup.oom_kills() == 0
    assert status.balloon_pages < 384 * PAGES_PER_MiB  # the balloon yielded
    assert minihost.stat("pressure_deflates") >= 1 or status.agent_state == "refusing"
    assert status.balloon_pages + 400 * PAGES_PER_MiB <= 512 * PAGES_PER_MiB


def test_kill_9_frees_the_balloon_through_the_kernel(make_cgroup, minihost):
    cgroup = make_cgroup(512 * MiB, 512 * MiB)
    agent = start_agent(cgroup, minihost, "victim")
    minihost.pump(lambda: minihost.hellos, 10, "hello")
    minihost.set_target("victim", 256 * PAGES_PER_MiB)
    minihost.pump(lambda: (s := minihost.last_status()) is not None and s.balloon_pages == 256 * PAGES_PER_MiB,
                  60, "balloon at 256 MiB")
    usage_inflated = cgroup.usage_bytes()
    agent.kill()
    agent.wait(timeout=10)
    _wait(lambda: usage_inflated - cgroup.usage_bytes() >= 250 * MiB, 10, "usage to drop by the balloon")


def test_active_workloads_are_never_oom_killed_by_inflation(make_cgroup, minihost):
    """Two guests, each an active 300 MiB working set in 512 MiB with swap, both asked for a
    211 MiB balloon at once (the by-hand lab): the balloon must leave the working sets room.
    Before the fix the agent counted the hot working set as swappable and one guest thrashed
    into an OOM kill in about half the runs."""
    guests = []
    for name in ("active-a", "active-b"):
        cgroup = make_cgroup(512 * MiB, 512 * MiB)
        guests.append((name, cgroup, start_workload(cgroup, "--size", "300MiB"), None))
    guests = [(name, cg, work, start_agent(cg, minihost, name)) for name, cg, work, _ in guests]
    minihost.pump(lambda: len(minihost.hellos) == 2, 10, "hellos")
    for name, *_ in guests:
        minihost.set_target(name, 211 * PAGES_PER_MiB)
    deadline = time.monotonic() + 20  # inflate, then hold: the steady state is where thrashing kills
    minihost.pump(lambda: time.monotonic() > deadline, 25, "inflation and a hold")
    for name, cgroup, workload, agent in guests:
        assert cgroup.oom_kills() == 0, f"{name}: OOM kill"
        assert workload.poll() is None and agent.poll() is None, name
    held = {s.balloon_pages for s in minihost.statuses[-10:]}
    assert max(held) >= 64 * PAGES_PER_MiB  # the guests still give what they can spare
