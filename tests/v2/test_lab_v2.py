"""`balloonctl lab up|down` end to end on a real cgroup-v2 kernel (the v2 guest): hostd and two
256 MiB guests in v2 memory cgroups with swap; the idle guest is ballooned past the active one;
`lab down` leaves nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_loopback_port, require_root, require_swap
from tests.e2e.compose import wait_for
from tests.v2.v2 import ROOT, MiB, mib, remove_stale, require_v2

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.swap, pytest.mark.timeout(900)]
CGROUP_NAME = "balloonlab-v2-lab"
LAB_FILE = """
[guests.web]
memory = "256MiB"
swap = "256MiB"
phases = "active 120MiB"

[guests.batch]
memory = "256MiB"
swap = "256MiB"
phases = "active 120MiB for 20s, idle 900s"
"""
HOSTD_FILE = """
host_memory_bytes = "300MiB"
idle_tax_ratio = 0.75
sample_period_ms = "3s"
balance_period_ms = "2s"
report_interval_ms = "1s"
"""


def balloonctl(*args: str, endpoint: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "balloonctl", "--endpoint", endpoint, *args],
                          capture_output=True, text=True, timeout=timeout_s)


def test_lab_up_balloons_the_idle_guest_past_the_active_one_and_down_leaves_nothing(
        tmp_path: Path, monkeypatch, figures) -> None:
    require_root()
    require_v2()
    require_swap(1 << 30)
    monkeypatch.setenv("BALLOONLAB_HTTP_ADDRESS", "off")
    remove_stale(CGROUP_NAME)
    (tmp_path / "lab.toml").write_text(LAB_FILE)
    (tmp_path / "hostd.toml").write_text(HOSTD_FILE)
    state_dir = tmp_path / "state"
    endpoint = f"tcp://127.0.0.1:{free_loopback_port()}"
    common = ["--state-dir", str(state_dir), "--cgroup-name", CGROUP_NAME]
    parent = ROOT / CGROUP_NAME
    started = time.monotonic()
    up = balloonctl("lab", "up", *common, "--lab-file", str(tmp_path / "lab.toml"), "--hostd-config",
                    str(tmp_path / "hostd.toml"), "--agent-endpoint", f"tcp://127.0.0.1:{free_loopback_port()}",
                    "--wait", "300s", endpoint=endpoint, timeout_s=420)
    registered = time.monotonic() - started
    oom_kills: dict[str, int] = {}
    try:
        assert up.returncode == 0, up.stderr
        print(up.stderr, up.stdout)
        assert "2 guests registered" in up.stdout
        for name in ("web", "batch"):
            assert (parent / name / "memory.max").read_text().strip() == str(256 * MiB)
            assert (parent / name / "memory.swap.max").read_text().strip() == str(256 * MiB)

        latest: dict[str, Any] = {}

        def idle_batch_gives_more() -> bool:
            result = balloonctl("lab", "status", *common, "--json", endpoint=endpoint)
            if result.returncode != 0:
                return False
            report = json.loads(result.stdout)
            latest.update(report)
            vms = {vm["vm_id"]: vm for vm in (report["hostd"] or {}).get("vms", [])}
            return (len(vms) == 2 and vms["batch"]["workload"].get("touches_per_s") == 0
                    and vms["batch"]["balloon_bytes"] > vms["web"]["balloon_bytes"] + 16 * MiB)

        shifted = wait_for(idle_batch_gives_more, timeout_s=400, interval_s=3)
        vms = {vm["vm_id"]: vm for vm in latest["hostd"]["vms"]}
        print({name: (vm["balloon_bytes"] // MiB, vm["swap_current_bytes"] // MiB, vm["workload"])
               for name, vm in vms.items()})
        assert shifted, "under τ = 0.75 the idle batch guest's balloon never grew past the active web guest's"
        shifted_at = time.monotonic() - started
        assert all(guest["alive"] for guest in latest["guests"].values()), latest["guests"]
        assert vms["web"]["workload"]["touches_per_s"] > 0, vms["web"]["workload"]
        for name in ("web", "batch"):
            events = dict(line.split() for line in (parent / name / "memory.events").read_text().splitlines())
            oom_kills[name] = int(events["oom_kill"])
        assert oom_kills == {"web": 0, "batch": 0}, oom_kills
        figures.update(lab_up_registered_s=round(registered, 1), idle_ballooned_past_active_s=round(shifted_at, 1),
                       **{f"{name}_balloon_MiB": mib(vm["balloon_bytes"]) for name, vm in vms.items()},
                       **{f"{name}_swap_MiB": mib(guest["swap_bytes"]) for name, guest in latest["guests"].items()},
                       oom_kills=sum(oom_kills.values()))
    finally:
        down = balloonctl("lab", "down", *common, endpoint=endpoint, timeout_s=300)
        print(down.stderr)
    assert down.returncode == 0, down.stderr
    assert not parent.exists(), "lab down left its cgroups behind"
    assert not (state_dir / "state.json").exists()
    leftover = subprocess.run(["pgrep", "-f", str(state_dir)], capture_output=True, text=True)
    assert leftover.stdout == "", f"lab down left processes behind: {leftover.stdout}"
    figures["lab_up_to_down_s"] = round(time.monotonic() - started, 1)
