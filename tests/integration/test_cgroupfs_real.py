"""The cgroupfs backend on real cgroups (v1 here): lowering a guest's limit pushes its memory
to swap without any agent (vSwap's mechanism), raising it gives the room back, and the freezer
stops and restarts its tasks."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hostd.cgroupfs import CgroupfsBackend
from lab import cgroups
from tests.conftest import require, require_root, require_swap

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.swap, pytest.mark.timeout(180)]
MiB = 1 << 20
PARENT = f"balloonlab-test-backend-{os.getpid()}"  # a run of its own: never an earlier run's leftovers


def test_lower_limit_swaps_the_guest_out_then_freeze_and_thaw(tmp_path: Path) -> None:
    require_root()
    require_swap(1 << 30)
    version = cgroups.memory_cgroup_version()
    parent = cgroups.create_parent(version, PARENT)
    guest = cgroups.create_guest(parent, version, "vm", 512 * MiB, 512 * MiB)
    backend = CgroupfsBackend()
    freezer = Path("/sys/fs/cgroup/freezer") / PARENT / "vm"
    report = tmp_path / "workload.json"
    process = None
    try:
        if version == 1:
            require(Path("/sys/fs/cgroup/freezer").is_dir(), "needs the v1 freezer hierarchy")
            freezer.mkdir(parents=True)
        procs = [guest / "cgroup.procs"] + ([freezer / "cgroup.procs"] if version == 1 else [])
        process = subprocess.Popen(
            [sys.executable, "-m", "guestagent.workload", "--phases", "grow to 240MiB at 512MiB/s, idle",
             "--report-file", str(report), "--report-interval", "500ms"],
            stdout=subprocess.DEVNULL, preexec_fn=lambda: [p.write_text(str(os.getpid())) for p in procs])
        deadline = time.monotonic() + 30
        while (cgroups.usage(guest, version)["memory_bytes"] or 0) < 230 * MiB:
            assert time.monotonic() < deadline, "workload never grew"
            time.sleep(0.2)
        # (a busy host's own reclaim may have paged a little of it out already)
        swap_before = cgroups.usage(guest, version)["swap_bytes"] or 0
        assert swap_before <= 16 * MiB

        started = time.monotonic()
        backend.set_limit_bytes(f"{PARENT}/vm", 128 * MiB)  # what a swap target of ~112 MiB would do
        swapped = cgroups.usage(guest, version)["swap_bytes"] or 0
        print(f"limit 512 → 128 MiB: swap {swapped // MiB} MiB after {time.monotonic() - started:.2f} s")
        assert backend.limit_bytes(f"{PARENT}/vm") == 128 * MiB
        assert swapped - swap_before >= 90 * MiB
        assert (cgroups.usage(guest, version)["memory_bytes"] or 0) <= 128 * MiB
        backend.set_limit_bytes(f"{PARENT}/vm", 512 * MiB)
        assert backend.limit_bytes(f"{PARENT}/vm") == 512 * MiB

        deadline = time.monotonic() + 10
        while not report.exists():
            assert time.monotonic() < deadline, "the workload never reported"
            time.sleep(0.1)
        backend.set_frozen(f"{PARENT}/vm", True)
        deadline = time.monotonic() + 10
        while not backend.frozen(f"{PARENT}/vm"):
            assert time.monotonic() < deadline, "never frozen"
            time.sleep(0.05)
        before = json.loads(report.read_text())["ts"]
        time.sleep(2)  # the workload reports every 0.5 s: not while frozen
        assert json.loads(report.read_text())["ts"] == before
        assert backend.thaw_all([f"{PARENT}/vm"]) == []
        deadline = time.monotonic() + 10
        while json.loads(report.read_text())["ts"] == before:
            assert time.monotonic() < deadline, "did not run again after the thaw"
            time.sleep(0.2)
    finally:
        if process is not None:
            with contextlib.suppress(Exception):
                backend.set_frozen(f"{PARENT}/vm", False)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
        cgroups.remove(parent)
        if freezer.parent.exists():
            cgroups.remove(freezer.parent)
