"""hostd on a real cgroup-v2 kernel (the v2 guest), a guest with no agent: host swap by
lowering memory.max, blocking through cgroup.freeze, and kill -9 undone by the next hostd."""

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

import pytest

from hostd.cgroupfs import CgroupfsBackend
from lab import cgroups
from tests.conftest import require_root, require_swap
from tests.v2.hostd_v2 import SlowHostd
from tests.v2.v2 import ROOT, MiB, mib, remove_stale, require_v2, wait

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.swap, pytest.mark.timeout(600)]
PARENT = "balloonlab-v2-vswap"
CGROUP = f"{PARENT}/plain"
HELD_MiB = 256


@dataclass
class Guest:
    path: Path
    process: subprocess.Popen[bytes]
    report: Path

    def memory_max(self) -> int | None:
        return CgroupfsBackend().limit_bytes(CGROUP)

    def frozen(self) -> bool:
        return CgroupfsBackend().frozen(CGROUP)

    def freeze_file(self) -> str:
        return (self.path / "cgroup.freeze").read_text().strip()

    def swap(self) -> int:
        return int((self.path / "memory.swap.current").read_text())

    def last_report_ts(self) -> float:
        return float(json.loads(self.report.read_text())["ts"])


@pytest.fixture
def plain_guest(tmp_path: Path) -> Iterator[Guest]:
    """No agent: a 512 MiB memory.max and 512 MiB of swap, holding 256 MiB it then leaves idle."""
    require_root()
    require_v2()
    require_swap(1 << 30)
    remove_stale(PARENT)
    parent = cgroups.create_parent(2, PARENT)
    path = cgroups.create_guest(parent, 2, "plain", 512 * MiB, 512 * MiB)
    report = tmp_path / "plain.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "guestagent.workload", "--phases", f"grow to {HELD_MiB}MiB at 256MiB/s, idle",
         "--report-file", str(report), "--report-interval", "500ms"],
        stdout=subprocess.DEVNULL, preexec_fn=lambda: (path / "cgroup.procs").write_text(str(os.getpid())))
    try:
        wait(lambda: int((path / "memory.current").read_text()) >= (HELD_MiB - 5) * MiB and report.exists(), 180,
             "the workload to grow")
        yield Guest(path, process, report)
    finally:
        with contextlib.suppress(Exception):
            CgroupfsBackend().set_frozen(CGROUP, False)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        cgroups.remove(parent)


def _hostd(tmp_path: Path, *flags: str, vm_table: str = "") -> SlowHostd:
    config = tmp_path / "hostd.toml"
    config.write_text(f'[vms.plain]\ncgroup = "{CGROUP}"\n{vm_table}')
    return SlowHostd(tmp_path, "--config", str(config), "--vswap-state-file", str(tmp_path / "vswap.json"),
                     "--balance-period", "1s", "--report-interval", "500ms", *flags)


def _vm(snapshot, vm_id: str = "plain"):
    return next(v for v in snapshot["vms"] if v["vm_id"] == vm_id)


def test_host_swap_through_memory_max_and_blocking_through_cgroup_freeze(plain_guest, tmp_path, figures):
    hostd = _hostd(tmp_path, "--host-memory", "160MiB", "--block-max", "60s")
    try:
        started = time.monotonic()
        snapshot = hostd.wait_until(lambda s: any(v["vm_id"] == "plain" for v in s["vms"]), 120, "plain to appear")
        assert _vm(snapshot)["has_agent"] is False
        def events() -> set[str]:
            lines = hostd.event_log.read_text().splitlines() if hostd.event_log.exists() else []
            return {json.loads(line)["event"] for line in lines}

        # Frozen in the low state: seen in cgroup.events, or (on a loaded host, a short freeze
        # between two looks) in hostd's event log.
        seen_frozen: list[bool] = []

        def blocked() -> bool:
            seen_frozen.append(plain_guest.frozen() and plain_guest.freeze_file() == "1")
            return seen_frozen[-1] or "block" in events()

        frozen_at = wait(blocked, 180, "the freeze in the low state (cgroup.freeze)")
        lowest = [plain_guest.memory_max() or 0]

        def swapped() -> bool:
            lowest.append(plain_guest.memory_max() or 0)
            return plain_guest.swap() >= 64 * MiB

        swapped_at = wait(swapped, 180, "host swap to take 64 MiB") + frozen_at
        assert min(lowest) < 512 * MiB
        swap = plain_guest.swap()
        thawed_at = wait(lambda: not plain_guest.frozen(), 180, "the thaw once free memory recovered") + swapped_at
        before = plain_guest.last_report_ts()
        wait(lambda: plain_guest.last_report_ts() > before, 60, "the workload to run again")
        assert plain_guest.process.poll() is None  # paged out, never killed
        assert int(cgroups.usage(plain_guest.path, 2)["swap_bytes"] or 0) >= 32 * MiB
        events_file = plain_guest.path / "memory.events"
        oom_kills = int(dict(line.split() for line in events_file.read_text().splitlines())["oom_kill"])
        assert oom_kills == 0

        hostd.ctl("host", "host_memory=8GiB")
        restored = wait(lambda: plain_guest.memory_max() == 512 * MiB, 120, "memory.max back at 512 MiB")
        kinds = events()
        assert {"vswap", "block", "unblock"} <= kinds, kinds
        figures.update(frozen_after_s=round(frozen_at, 1), freeze_seen_in_cgroup_events=any(seen_frozen),
                       swap_64MiB_after_s=round(swapped_at, 1),
                       thawed_after_s=round(thawed_at, 1), lowest_memory_max_MiB=mib(min(lowest)),
                       swap_MiB=mib(swap), limit_restored_within_s=round(restored, 1), oom_kills=oom_kills,
                       since_hostd_start_s=round(time.monotonic() - started, 1))
    finally:
        hostd.stop()
    assert not plain_guest.frozen()


def test_kill_9_while_frozen_and_squeezed_is_undone_by_the_next_hostd(plain_guest, tmp_path, figures):
    # The reservation keeps the guest from being paged out far enough to leave the low state:
    # it stays frozen (bounded by --block-max) with its limit lowered.
    hostd = _hostd(tmp_path, "--host-memory", "160MiB", "--block-max", "300s", vm_table='reservation = "200MiB"\n')
    try:
        frozen_at = wait(plain_guest.frozen, 120, "the freeze")
        lowered_at = wait(lambda: (plain_guest.memory_max() or 0) < 512 * MiB, 120, "a lowered memory.max")
        lowered = plain_guest.memory_max()
        assert lowered is not None and lowered >= (200 + 16) * MiB  # never below the reservation (+ margin)
        record = json.loads((tmp_path / "vswap.json").read_text())
        assert record[CGROUP]["frozen"] is True and record[CGROUP]["own_limit_bytes"] == 512 * MiB
    finally:
        hostd.stop(kill=True)  # kill -9: no chance to clean up
    assert plain_guest.frozen() and plain_guest.memory_max() == lowered  # left behind as it was

    again = _hostd(tmp_path, "--host-memory", "8GiB")
    try:
        restored = wait(lambda: not plain_guest.frozen() and plain_guest.memory_max() == 512 * MiB, 120,
                        "the restarted hostd to thaw and restore")
        assert not (tmp_path / "vswap.json").exists()
        before = plain_guest.last_report_ts()
        wait(lambda: plain_guest.last_report_ts() > before, 60, "the workload to run again")
        figures.update(frozen_after_s=round(frozen_at, 1), lowered_after_s=round(frozen_at + lowered_at, 1),
                       memory_max_left_by_kill_9_MiB=mib(lowered), restored_by_next_hostd_within_s=round(restored, 1))
    finally:
        again.stop()
    assert (ROOT / CGROUP / "cgroup.freeze").read_text().strip() == "0"
