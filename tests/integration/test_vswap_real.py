"""Host-level reclamation with a real hostd on real cgroups with swap (v1 here): a guest with
no agent is swapped out by the host under pressure and blocked in the low state, and gets its
limit back when pressure ends; kill -9 of hostd while a guest is frozen and squeezed is undone
by the next hostd at start-up."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from hostd.cgroupfs import CgroupfsBackend
from lab import cgroups
from tests.conftest import require, require_root, require_swap
from tests.integration.cgroups import remove_tree
from tests.integration.conftest import start_workload
from tests.integration.hostd_proc import HostdProcess, vm

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.swap, pytest.mark.timeout(300)]
MiB = 1 << 20
PARENT = "balloonlab-test-vswap"
CGROUP = f"{PARENT}/plain"


@dataclass
class Guest:
    memory: Path
    freezer: Path | None
    version: int
    process: subprocess.Popen[bytes]
    report: Path

    def usage(self) -> dict[str, int | None]:
        return cgroups.usage(self.memory, self.version)

    def frozen(self) -> bool:
        return CgroupfsBackend().frozen(CGROUP)

    def last_report_ts(self) -> float:
        return json.loads(self.report.read_text())["ts"]


@pytest.fixture
def plain_guest(tmp_path: Path) -> Iterator[Guest]:
    """A guest with no agent: 1 GiB limit and 1 GiB of swap, holding 400 MiB it then leaves idle."""
    require_root()
    require_swap(1 << 30)
    version = cgroups.memory_cgroup_version()
    for stale in (Path("/sys/fs/cgroup/freezer") / PARENT, cgroups.memory_hierarchy(version) / PARENT):
        remove_tree(stale)  # an interrupted earlier run's (thawed first, or its tasks cannot die)
    parent = cgroups.create_parent(version, PARENT)
    memory = cgroups.create_guest(parent, version, "plain", 1024 * MiB, 1024 * MiB)
    freezer = Path("/sys/fs/cgroup/freezer") / PARENT / "plain" if version == 1 else None
    process = None
    try:
        if freezer is not None:
            require(freezer.parent.parent.is_dir(), "needs the v1 freezer hierarchy")
            freezer.mkdir(parents=True, exist_ok=True)
        procs = [memory / "cgroup.procs"] + ([freezer / "cgroup.procs"] if freezer else [])
        report = tmp_path / "plain.json"
        process = subprocess.Popen(
            [sys.executable, "-m", "guestagent.workload", "--phases", "grow to 400MiB at 512MiB/s, idle",
             "--report-file", str(report), "--report-interval", "500ms"],
            stdout=subprocess.DEVNULL, preexec_fn=lambda: [p.write_text(str(os.getpid())) for p in procs])
        guest = Guest(memory, freezer, version, process, report)
        deadline = time.monotonic() + 30
        while (guest.usage()["memory_bytes"] or 0) < 395 * MiB or not report.exists():
            assert time.monotonic() < deadline, "the workload never grew"
            time.sleep(0.2)
        yield guest
    finally:
        with contextlib.suppress(Exception):
            CgroupfsBackend().set_frozen(CGROUP, False)
        if process is not None:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
        cgroups.remove(parent)
        if freezer is not None and freezer.parent.exists():
            cgroups.remove(freezer.parent)


def _hostd(tmp_path: Path, *flags: str, vm_table: str = "") -> HostdProcess:
    config = tmp_path / "hostd.toml"
    config.write_text(f'[vms.plain]\ncgroup = "{CGROUP}"\n{vm_table}')
    return HostdProcess(tmp_path, "--config", str(config), "--vswap-state-file", str(tmp_path / "vswap.json"),
                        "--balance-period", "1s", "--report-interval", "200ms", *flags)


def _wait(predicate, timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.1)
    return time.monotonic() - started


def test_guest_without_agent_is_swapped_by_the_host_blocked_in_low_and_given_back(plain_guest, tmp_path):
    backend = CgroupfsBackend()
    hostd = _hostd(tmp_path, "--host-memory", "250MiB", "--block-max", "30s")
    try:
        started = time.monotonic()
        snapshot = hostd.wait_until(lambda s: any(v["vm_id"] == "plain" for v in s["vms"]), 10, "plain to appear")
        assert vm(snapshot, "plain")["has_agent"] is False
        # 400 MiB held on a 250 MiB host: low state → blocked, and limited down toward what
        # the policy grants it (250 MiB minus minFree), 64 MiB a second.
        _wait(plain_guest.frozen, 10, "the guest to be frozen in the low state")
        frozen_at = time.monotonic() - started
        seen: list[dict] = []  # the swap target is gone (high state) once the guest is paged out

        def swapped(snapshot) -> bool:
            seen.append(vm(snapshot, "plain"))
            return (seen[-1]["swap_current_bytes"] or 0) >= 140 * MiB

        hostd.wait_until(swapped, 30, "host swap to take 140 MiB")
        swapped_at = time.monotonic() - started
        swap_target = max(v["swap_target_bytes"] for v in seen)
        assert swap_target > 0 and all(v["balloon_target_bytes"] == 0 for v in seen)
        limit = backend.limit_bytes(CGROUP)
        assert limit is not None and limit <= 400 * MiB
        # Free memory recovers as the guest is paged out: thawed, running again.
        _wait(lambda: not plain_guest.frozen(), 20, "the thaw once free memory recovered")
        thawed_at = time.monotonic() - started
        before = plain_guest.last_report_ts()
        _wait(lambda: plain_guest.last_report_ts() > before, 10, "the workload to run again")
        usage = plain_guest.usage()
        print(f"no agent: swap target {swap_target // MiB} MiB; frozen after {frozen_at:.1f} s; "
              f"swap {usage['swap_bytes'] // MiB} MiB, resident {usage['memory_bytes'] // MiB} MiB at "
              f"{swapped_at:.1f} s; thawed at {thawed_at:.1f} s; limit {limit // MiB} MiB")
        assert usage["swap_bytes"] >= 140 * MiB
        assert plain_guest.process.poll() is None  # paged out, never killed

        # Pressure ends: the limit climbs back, a step a second, to the guest's own.
        hostd.ctl("host", "host_memory=8GiB")
        waited = _wait(lambda: backend.limit_bytes(CGROUP) == 1024 * MiB, 30, "the original limit back")
        print(f"pressure over: limit back to 1024 MiB after {waited:.1f} s")
        assert not (tmp_path / "vswap.json").exists()  # nothing left to undo
        events = [json.loads(line) for line in hostd.event_log.read_text().splitlines()]
        kinds = {e["event"] for e in events}
        assert {"vswap", "block", "unblock"} <= kinds
    finally:
        hostd.stop()
    assert not plain_guest.frozen()


def test_kill_9_while_frozen_and_squeezed_is_undone_by_the_next_hostd(plain_guest, tmp_path):
    backend = CgroupfsBackend()
    # The reservation keeps the guest from being paged out far enough to leave the low state:
    # it stays frozen (bounded by --block-max) with its limit lowered.
    hostd = _hostd(tmp_path, "--host-memory", "300MiB", "--block-max", "60s",
                   vm_table='reservation = "350MiB"\n')
    try:
        _wait(plain_guest.frozen, 15, "the freeze")
        _wait(lambda: (backend.limit_bytes(CGROUP) or 0) < 1024 * MiB, 15, "a lowered limit")
        lowered = backend.limit_bytes(CGROUP)
        assert lowered >= (350 + 16) * MiB  # never below the reservation (+ the floor's margin)
        record = json.loads((tmp_path / "vswap.json").read_text())
        assert record[CGROUP]["frozen"] is True and record[CGROUP]["own_limit_bytes"] == 1024 * MiB
    finally:
        hostd.stop(kill=True)  # kill -9: no chance to clean up
    assert plain_guest.frozen() and backend.limit_bytes(CGROUP) == lowered  # left behind as it was

    again = _hostd(tmp_path, "--host-memory", "8GiB")
    try:
        waited = _wait(lambda: not plain_guest.frozen() and backend.limit_bytes(CGROUP) == 1024 * MiB, 10,
                       "the restarted hostd to thaw and restore")
        print(f"restarted hostd thawed the guest and restored 1024 MiB within {waited:.1f} s")
        assert not (tmp_path / "vswap.json").exists()
        before = plain_guest.last_report_ts()
        _wait(lambda: plain_guest.last_report_ts() > before, 10, "the workload to run again")
    finally:
        again.stop()


def test_balloon_at_mctlmax_leaves_the_rest_to_host_swap(make_cgroup, tmp_path):
    cgroup = make_cgroup(512 * MiB, 512 * MiB)
    workload = start_workload(cgroup, "--phases", "grow to 350MiB at 512MiB/s, idle")
    relative = cgroup.path.name
    config = tmp_path / "hostd.toml"
    config.write_text(f'[vms.capped]\ncgroup = "{relative}"\nmaxmemctl = "64MiB"\n')
    hostd = HostdProcess(tmp_path, "--config", str(config), "--vswap-state-file", str(tmp_path / "vswap.json"),
                         "--host-memory", "300MiB", "--balance-period", "1s", "--report-interval", "500ms",
                         "--block-max", "0")
    backend = CgroupfsBackend()
    try:
        with (tmp_path / "agent.log").open("w") as log:
            agent = cgroup.python("-m", "guestagent", "--vm-id", "capped", "--host-endpoint", hostd.agent_endpoint,
                                  "--cgroup-path", str(cgroup.path), "--report-interval", "500ms", stderr=log)
        started = time.monotonic()
        # Both in one snapshot: the balloon reaches its cap a balance period before the policy's
        # next pass sets the swap target for the rest (a single read after the first raced).
        snapshot = hostd.wait_until(
            lambda s: any(v["vm_id"] == "capped" and v["balloon_bytes"] == 64 * MiB and v["swap_target_bytes"] > 0
                          for v in s["vms"]), 60, "the balloon at its 64 MiB cap and a swap target for the rest")
        capped = vm(snapshot, "capped")
        assert capped["has_agent"] and capped["balloon_max_bytes"] == 64 * MiB
        assert capped["swap_target_bytes"] > 0 and "beyond the balloon cap" in capped["reason"]
        goal = 512 * MiB - capped["swap_target_bytes"]
        _wait(lambda: backend.limit_bytes(relative) is not None and backend.limit_bytes(relative) <= goal + MiB,
              30, "the limit at memsz − swap target")
        reached = time.monotonic() - started
        swap = cgroup.swap_bytes()
        print(f"MCTLMAX 64 MiB: swap target {capped['swap_target_bytes'] // MiB} MiB, limit "
              f"{backend.limit_bytes(relative) // MiB} MiB after {reached:.1f} s, guest swap {swap // MiB} MiB")
        assert swap >= 32 * MiB  # the remainder came out of the guest by host swap, not its balloon
        assert agent.poll() is None and workload.poll() is None and cgroup.oom_kills() == 0
    finally:
        hostd.stop()
    assert backend.limit_bytes(relative) == 512 * MiB  # a clean exit gives the limit back


def test_reclaim_mode_gives_the_balloons_memory_to_the_host(make_cgroup, tmp_path):
    cgroup = make_cgroup(512 * MiB, 512 * MiB)
    start_workload(cgroup, "--phases", "grow to 100MiB at 256MiB/s, idle")
    backend = CgroupfsBackend()
    config = tmp_path / "hostd.toml"
    config.write_text(f'[vms.rec]\ncgroup = "{cgroup.path.name}"\n')
    figures = {}
    for reclaim in ("false", "true"):
        hostd = HostdProcess(tmp_path, "--config", str(config), "--vswap-state-file", str(tmp_path / "vswap.json"),
                             "--host-memory", "8GiB", "--report-interval", "500ms", "--reclaim-mode", reclaim)
        agent = None
        try:
            with (tmp_path / f"agent-{reclaim}.log").open("w") as log:
                agent = cgroup.python("-m", "guestagent", "--vm-id", "rec", "--host-endpoint", hostd.agent_endpoint,
                                      "--cgroup-path", str(cgroup.path), "--report-interval", "500ms",
                                      "--want-pfn", "false", stderr=log)  # reclaim mode needs VPNs
            hostd.wait_until(lambda s: any(v["vm_id"] == "rec" and v["alive"] for v in s["vms"]), 20, "the agent")
            time.sleep(1)
            usage_before, available_before = cgroup.usage_bytes(), psutil.virtual_memory().available
            unevictable_before = cgroup.stat().get("unevictable", 0)
            hostd.ctl("target", "rec", "256MiB")
            hostd.wait_until(lambda s: vm(s, "rec")["balloon_bytes"] == 256 * MiB, 60, "the balloon at 256 MiB")
            if reclaim == "true":
                _wait(lambda: backend.limit_bytes(cgroup.path.name) == 256 * MiB, 10,
                      "the limit lowered by the balloon")
            time.sleep(1)
            figures[reclaim] = {"usage": cgroup.usage_bytes() - usage_before,
                                "unevictable": cgroup.stat().get("unevictable", 0) - unevictable_before,
                                "balloon": vm(hostd.status(), "rec")["balloon_bytes"],
                                "available": available_before - psutil.virtual_memory().available,
                                "limit": backend.limit_bytes(cgroup.path.name)}
            assert agent.poll() is None
        finally:
            if agent is not None:
                agent.terminate()  # deflates and says bye
                agent.wait(timeout=30)
            hostd.stop()
        assert backend.limit_bytes(cgroup.path.name) == 512 * MiB  # given back at exit
    off, on = figures["false"], figures["true"]
    print(f"256 MiB balloon: guest cgroup grew {off['usage'] // MiB} MiB without reclaim mode "
          f"({off['unevictable'] // MiB} MiB unevictable, balloon {off['balloon'] // MiB} MiB), "
          f"{on['usage'] // MiB} MiB with it (limit {on['limit'] // MiB} MiB); host MemAvailable fell "
          f"{off['available'] // MiB} vs {on['available'] // MiB} MiB")
    assert off["limit"] == 512 * MiB and on["limit"] == 256 * MiB  # the guest cannot take it back
    # Without reclaim mode the pinned pages are charged to the guest: its unevictable LRU holds
    # them (usage alone also moves with the cache the guest drops meanwhile: once 167 MiB in CI).
    assert off["unevictable"] >= 256 * MiB - 16 * MiB  # the per-CPU LRU batches lag a little
    assert on["usage"] <= 32 * MiB and on["unevictable"] <= 16 * MiB  # handed back: the host has it
