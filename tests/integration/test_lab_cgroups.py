"""`balloonctl lab up|down|status` for real: hostd and three guests in memory cgroups with swap,
the same evidence as the compose e2e test, and nothing left behind by `lab down`."""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import select
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from lab import cgroups
from tests.conftest import free_loopback_port, require, require_root, require_swap
from tests.e2e.compose import wait_for
from tests.integration.browser import Browser, chromium_binary

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.swap, pytest.mark.timeout(600)]
MiB = 1 << 20
LAB_FILE = """
[guests.web]
memory = "512MiB"
swap = "512MiB"
phases = "active 320MiB"

[guests.batch]
memory = "512MiB"
swap = "512MiB"
phases = "active 380MiB for 10s, idle 900s"

[guests.db]
memory = "512MiB"
swap = "512MiB"
phases = "active 280MiB"
"""


ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


def check_dashboard(url: str, screenshot: Path) -> None:
    require(chromium_binary() is not None, "needs chromium (apt-get install chromium)")
    browser = Browser()
    try:
        browser.call("Page.navigate", url=url)
        deadline = time.monotonic() + 30
        while browser.evaluate("document.body.dataset.ready") != "true":
            assert time.monotonic() < deadline, f"charts never had data for every vm: " \
                f"{browser.evaluate('document.body.dataset.vmsWithData')!r}; errors {browser.console_errors}"
            time.sleep(0.5)
        assert browser.evaluate("document.body.dataset.vmsWithData") == "batch,db,web"
        assert browser.evaluate("document.querySelectorAll('#events li').length") > 0, "no decisions shown"
        assert browser.evaluate("document.querySelectorAll('#vms canvas').length") == 3
        time.sleep(3)  # a few more pushed updates, then the picture
        browser.screenshot(screenshot)
        assert browser.console_errors == [], browser.console_errors
        print(f"dashboard screenshot: {screenshot}")
    finally:
        browser.close()


def run_in_pty(argv: list[str], timeout_s: float = 30) -> str:
    """Run argv on a pseudo-terminal (220 columns) and return everything it drew."""
    leader, follower = pty.openpty()
    os.set_inheritable(follower, True)
    environment = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "220", "LINES": "40"}
    process = subprocess.Popen(argv, stdin=follower, stdout=follower, stderr=follower, env=environment,
                               close_fds=True)
    os.close(follower)
    output = b""
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            elif process.poll() is not None:
                break
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        os.close(leader)
    assert process.returncode == 0, output.decode(errors="replace")[-2000:]
    return output.decode(errors="replace")


def balloonctl(*args: str, endpoint: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "balloonctl", "--endpoint", endpoint, *args],
                          capture_output=True, text=True, timeout=120)


def test_lab_up_balloons_the_idle_guest_and_lab_down_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    require_root()
    require_swap(1 << 30)
    # hostd reads these from its environment (the guests do not get them): seconds-scale periods
    monkeypatch.setenv("BALLOONLAB_SAMPLE_PERIOD", "3s")
    monkeypatch.setenv("BALLOONLAB_BALANCE_PERIOD", "2s")
    http_port = free_loopback_port()
    monkeypatch.setenv("BALLOONLAB_HTTP_ADDRESS", f"127.0.0.1:{http_port}")
    timeline = tmp_path / "timeline.jsonl"
    monkeypatch.setenv("BALLOONLAB_TIMELINE", str(timeline))
    lab_file = tmp_path / "lab.toml"
    lab_file.write_text(LAB_FILE)
    state_dir = tmp_path / "state"
    endpoint = f"tcp://127.0.0.1:{free_loopback_port()}"
    common = ["--state-dir", str(state_dir), "--cgroup-name", "balloonlab-test-lab"]
    parent = cgroups.memory_hierarchy(cgroups.memory_cgroup_version()) / "balloonlab-test-lab"
    started = time.monotonic()
    up = balloonctl("lab", "up", *common, "--lab-file", str(lab_file),
                    "--agent-endpoint", f"tcp://127.0.0.1:{free_loopback_port()}", endpoint=endpoint)
    try:
        assert up.returncode == 0, up.stderr
        print(up.stderr, up.stdout)
        assert "3 guests registered" in up.stdout
        for name in ("web", "batch", "db"):
            assert (parent / name).is_dir()

        latest: dict[str, Any] = {}

        def idle_batch_gives_more() -> bool:
            result = balloonctl("lab", "status", *common, "--json", endpoint=endpoint)
            report = json.loads(result.stdout)
            latest.update(report)
            vms = {vm["vm_id"]: vm for vm in (report["hostd"] or {}).get("vms", [])}
            return (len(vms) == 3 and vms["batch"]["workload"].get("touches_per_s") == 0
                    and vms["batch"]["balloon_bytes"] > vms["web"]["balloon_bytes"] + 32 * MiB)

        shifted = wait_for(idle_batch_gives_more, timeout_s=240, interval_s=2)
        vms = {vm["vm_id"]: vm for vm in latest["hostd"]["vms"]}
        print({name: (vm["balloon_bytes"] // MiB, vm["swap_current_bytes"] // MiB, vm["workload"])
               for name, vm in vms.items()})
        assert shifted, "under τ = 0.75 the idle batch guest's balloon never grew past the active web guest's"
        print(f"idle batch ballooned past web {time.monotonic() - started:.1f} s after lab up")
        assert all(guest["alive"] for guest in latest["guests"].values()), latest["guests"]
        assert sum(guest["swap_bytes"] for guest in latest["guests"].values()) > 16 * MiB, latest["guests"]
        for name in ("web", "db"):
            assert vms[name]["workload"]["touches_per_s"] > 0, vms[name]["workload"]
        text = balloonctl("lab", "status", *common, endpoint=endpoint)
        assert text.returncode == 0 and "batch" in text.stdout and "MCTLSZ" in text.stdout

        # balloonctl top in batch mode, parsed
        top = balloonctl("top", "-b", "-n", "2", "-d", "500ms", "--csv", "--sort", "mctlsz", endpoint=endpoint)
        assert top.returncode == 0, top.stderr
        table = list(csv.DictReader(io.StringIO(top.stdout)))
        assert len(table) == 6 and {row["VM"] for row in table} == {"web", "batch", "db"}
        assert table[0]["VM"] == "batch"  # sorted by balloon size, largest first
        assert float(table[0]["MCTLSZ(MiB)"]) > 32 and all(row["MCTL?"] == "Y" for row in table)
        # ...and the live view in a pseudo-terminal
        screen = run_in_pty([sys.executable, "-m", "balloonctl", "--endpoint", endpoint, "top", "-n", "2",
                             "-d", "500ms"])
        for part in ("STATE", "IDLE TAX 0.75", "MCTLSZ", "web", "batch", "db"):
            assert part in screen, f"{part!r} not on the live screen:\n{screen[-3000:]}"
        # /metrics on hostd's HTTP port
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as response:
            metrics = response.read().decode()
        assert 'balloonlab_vm_balloon_bytes{vm="batch"}' in metrics
        # the dashboard in a real headless Chromium: charts with data for every vm, no console errors
        check_dashboard(f"http://127.0.0.1:{http_port}/", ARTIFACTS / "dashboard.png")
    finally:
        down = balloonctl("lab", "down", *common, endpoint=endpoint)
        print(down.stderr)
    assert down.returncode == 0, down.stderr
    assert not parent.exists(), "lab down left its cgroups behind"
    state = state_dir / "state.json"
    assert not state.exists()
    leftover = subprocess.run(["pgrep", "-f", str(state_dir)], capture_output=True, text=True)
    assert leftover.stdout == "", f"lab down left processes behind: {leftover.stdout}"
    again = balloonctl("lab", "status", *common, endpoint=endpoint)
    assert again.returncode == 1 and "no lab is up" in again.stderr

    # hostd recorded the run: balloonctl plot renders it (3 vms × 6 series + free + 4 thresholds)
    plot = balloonctl("plot", str(timeline), "-o", str(tmp_path / "timeline.png"), endpoint=endpoint)
    assert plot.returncode == 0, plot.stderr
    print(plot.stdout)
    assert "3 vms, 23 series" in plot.stdout
    assert (tmp_path / "timeline.png").stat().st_size > 20_000


def test_lab_up_twice_is_refused_and_changes_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BALLOONLAB_HTTP_ADDRESS", "off")
    require_root()
    require_swap(1 << 30)
    lab_file = tmp_path / "lab.toml"
    lab_file.write_text('[guests.solo]\nmemory = "128MiB"\nswap = "128MiB"\nphases = "active 32MiB"\n')
    common = ["--state-dir", str(tmp_path / "state"), "--cgroup-name", "balloonlab-test-lab2"]
    endpoint = f"tcp://127.0.0.1:{free_loopback_port()}"
    agents = f"tcp://127.0.0.1:{free_loopback_port()}"
    first = balloonctl("lab", "up", *common, "--lab-file", str(lab_file), "--agent-endpoint", agents,
                       endpoint=endpoint)
    try:
        assert first.returncode == 0, first.stderr
        before = (tmp_path / "state" / "state.json").read_text()
        second = balloonctl("lab", "up", *common, "--lab-file", str(lab_file), "--agent-endpoint", agents,
                            endpoint=endpoint)
        assert second.returncode == 1 and "already up" in second.stderr
        assert (tmp_path / "state" / "state.json").read_text() == before
    finally:
        assert balloonctl("lab", "down", *common, endpoint=endpoint).returncode == 0
