"""`balloonctl attach` / `detach` on a real cgroup-v2 kernel (the v2 guest), as
tests/integration/test_attach.py does on v1: a balloon for a guest with no agent in it — a
plain v2 memory cgroup (`cgroup:PATH`) and a container on Docker's systemd cgroup driver
(`docker:NAME`, found at system.slice/docker-<id>.scope) — against a real hostd. The balloon's
pinned pages are the guest's (`unevictable` in its memory.stat, the agent's VmLck), the guest's
idle memory goes to its own swap (memory.swap.current), detach leaves < 4 MiB pinned, and the
target stopping makes the attached agent leave."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root, require_swap
from tests.integration import cgroups as test_cgroups
from tests.integration.attach_helpers import HOLDER, attach_logs, left_with_bye, memory_stat, start_attach
from tests.integration.cgroups import vm_locked_bytes
from tests.integration.hostd_proc import vm
from tests.v2.conftest import RESULTS
from tests.v2.docker_v2 import BASE_IMAGE, docker
from tests.v2.hostd_v2 import SlowHostd
from tests.v2.v2 import ROOT, MiB, mib, require_v2, wait

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.swap, pytest.mark.timeout(600)]
PAGES_PER_MiB = MiB // 4096
BALLOON_MiB = 64
HELD_MiB = 200


@pytest.fixture
def hostd(tmp_path: Path) -> Iterator[SlowHostd]:
    require_root()
    require_v2()
    require_swap(1 << 30)
    # Reports every 2 s: an agent re-registers when a lock stays unanswered for two host timeouts
    # ((3 + 2) reports each), and hostd under TCG on a loaded host can take over the 5 s that a
    # 500 ms interval allows: every re-hello costs a re-adoption (DUPLICATE refusals that stalled
    # the balloon for good came with them; the agent now unlocks such phantoms, motion.py).
    process = SlowHostd(tmp_path, "--host-memory", "4GiB", "--report-interval", "2s",
                        "--vswap-state-file", str(tmp_path / "vswap.json"))
    yield process
    process.stop()


def _detach(hostd: SlowHostd, tmp_path: Path, vm_id: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "balloonctl", "--endpoint", hostd.control_endpoint, "--token-file",
                           str(hostd.token_file), "detach", vm_id, "--state-dir", str(tmp_path / "attach")],
                          capture_output=True, text=True, timeout=180)


def _state(tmp_path: Path, vm_id: str) -> dict:
    path = tmp_path / "attach" / f"{vm_id}.json"
    wait(path.exists, 180, f"the attach state {path}")
    wait(lambda: "agent_pid" in json.loads(path.read_text() or "{}"), 60, "the agent's pid in the state")
    return json.loads(path.read_text())


def _keep_logs(hostd: SlowHostd, tmp_path: Path, name: str) -> None:
    """A failed run's whole story, brought out of the guest: the agents' and hostd's logs
    and hostd's event log (the tails printed in the report rarely reach the first refusal)."""
    print(attach_logs(tmp_path))
    if not RESULTS.is_dir():
        return
    kept = RESULTS / f"attach-{name}"
    kept.mkdir(exist_ok=True)
    for path in [*tmp_path.glob("attach-*.log"), hostd.log_path, hostd.event_log]:
        if path.exists():
            shutil.copy(path, kept / path.name)


def _swap(cgroup: Path) -> int:
    return int((cgroup / "memory.swap.current").read_text())


def _oom_kills(cgroup: Path) -> int:
    return int(dict(line.split() for line in (cgroup / "memory.events").read_text().splitlines())["oom_kill"])


def _migrations() -> dict[str, int]:
    """The kernel's counters of what moves mlocked pages to other frames: compaction
    (compact_unevictable_allowed) and khugepaged collapsing 4 KiB pages into a THP (seen in the
    v2 guest: 0 migrations, yet the agent found 8 × 512 pages on new frames)."""
    wanted = ("pgmigrate_success", "compact_migrate_scanned", "compact_stall", "thp_collapse_alloc")
    pairs = (line.split() for line in Path("/proc/vmstat").read_text().splitlines())
    return {key: int(value) for key, value in pairs if key in wanted}


def _balloon_to(hostd: SlowHostd, vm_id: str, size_mib: int, figures: dict) -> float:
    """Seconds from the target to the balloon at size_mib (after the agent registered)."""
    hostd.wait_until(lambda s: any(v["vm_id"] == vm_id and v["alive"] for v in s["vms"]), 180, f"{vm_id} registered")
    before = _migrations()
    hostd.client.target(vm_id, size_mib * PAGES_PER_MiB)
    started = time.monotonic()
    try:
        hostd.wait_until(lambda s: vm(s, vm_id)["balloon_bytes"] >= size_mib * MiB, 300,
                         f"{vm_id}'s balloon at {size_mib} MiB")
    finally:
        moved = {f"{key}_while_inflating": value - before.get(key, 0) for key, value in _migrations().items()}
        print(f"page migration while inflating: {moved}")
        figures.update(moved)
    return time.monotonic() - started


def _ballooned(hostd: SlowHostd, tmp_path: Path, cgroup: Path, vm_id: str, swap_before: int,
               figures: dict) -> int:
    """The balloon inflated to BALLOON_MiB by the attached agent: checked and recorded."""
    started = time.monotonic()
    agent_pid = _state(tmp_path, vm_id)["agent_pid"]
    assert agent_pid in [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]  # it joined the guest
    inflate_s = _balloon_to(hostd, vm_id, BALLOON_MiB, figures)
    # The pins are the guest's: its memory.stat shows what the agent has locked. Read together,
    # until they agree: memory.stat is flushed lazily on v2 (seen: 119 MiB unevictable right after
    # the status said 120), and a pressure deflate may follow the full balloon at once under TCG
    # (seen: PSI full avg10 10-15 %), so both are compared with each other, not with 120 MiB.
    readings: dict[str, int] = {}

    def charged() -> bool:
        readings.update(locked=vm_locked_bytes(agent_pid), unevictable=memory_stat(cgroup)["unevictable"])
        return readings["locked"] > 0 and readings["unevictable"] >= readings["locked"] - MiB

    wait(charged, 30, "the agent's VmLck in the guest's memory.stat")
    locked, unevictable = readings["locked"], readings["unevictable"]
    swapped = _swap(cgroup) - swap_before
    assert swapped >= BALLOON_MiB // 4 * MiB, f"only {swapped >> 20} MiB of the guest went to its swap"
    figures.update(cgroup=str(cgroup.relative_to(ROOT)), attached_and_ballooned_s=round(time.monotonic() - started, 1),
                   inflate_s=round(inflate_s, 1), balloon_MiB=BALLOON_MiB, agent_vmlck_MiB=mib(locked),
                   unevictable_MiB=mib(unevictable), guest_swap_rise_MiB=mib(swapped),
                   memory_max_MiB=mib(int((cgroup / "memory.max").read_text())),
                   memory_swap_max_MiB=mib(int((cgroup / "memory.swap.max").read_text())))
    return agent_pid


def _detached(hostd: SlowHostd, tmp_path: Path, cgroup: Path, vm_id: str, agent_pid: int,
              supervisor: subprocess.Popen[str], figures: dict) -> None:
    started = time.monotonic()
    result = _detach(hostd, tmp_path, vm_id)
    assert result.returncode == 0, result.stderr
    assert supervisor.wait(timeout=120) == 0
    assert not Path(f"/proc/{agent_pid}").exists() or vm_locked_bytes(agent_pid) == 0
    left = memory_stat(cgroup)["unevictable"]
    assert left < 4 * MiB, f"{left >> 20} MiB pinned memory left behind"
    hostd.wait_until(lambda s: left_with_bye(s, vm_id), 120, "the agent's bye")
    figures.update(detach_s=round(time.monotonic() - started, 1), unevictable_after_detach_MiB=mib(left))


def test_attach_to_a_v2_cgroup_balloons_it_and_detach_leaves_nothing_pinned(hostd, tmp_path, figures):
    cgroup = test_cgroups.TestCgroup(256 * MiB, 256 * MiB)
    try:
        holder = cgroup.python("-c", HOLDER.format(size=HELD_MiB), stdout=subprocess.PIPE)
        assert holder.stdout.readline().strip() == "ready"
        swap_before = _swap(cgroup.path)
        vm_id = f"plain-{uuid.uuid4().hex[:6]}"
        supervisor = start_attach(hostd, tmp_path, f"cgroup:{cgroup.path}", "--vm-id", vm_id, report_interval="2s")
        agent_pid = _ballooned(hostd, tmp_path, cgroup.path, vm_id, swap_before, figures)
        _detached(hostd, tmp_path, cgroup.path, vm_id, agent_pid, supervisor, figures)
        assert holder.poll() is None, "detaching disturbed the guest"
        figures["oom_kills"] = _oom_kills(cgroup.path)
        assert figures["oom_kills"] == 0
    except BaseException:
        _keep_logs(hostd, tmp_path, "cgroup")
        raise
    finally:
        cgroup.destroy()


@pytest.fixture
def container(engine) -> Iterator[tuple[str, str]]:
    """A container without our agent on the systemd driver: python3 holding memory it touched once."""
    name = f"balloonlab-v2-attach-{uuid.uuid4().hex[:6]}"
    container_id = docker("run", "-d", "--name", name, "--label", "balloonlab.v2=1", "--memory", "256m",
                          "--memory-swap", "512m", "--network", "none", BASE_IMAGE, "python3", "-c",
                          HOLDER.format(size=HELD_MiB), timeout_s=300)
    try:
        wait(lambda: "ready" in docker("logs", name, check=False), 180, "the container's service to get ready", 1)
        yield name, container_id
    finally:
        docker("rm", "-f", name, check=False)


@pytest.mark.e2e
def test_attach_to_a_container_on_the_systemd_driver_balloons_its_scope(hostd, tmp_path, container, figures):
    name, container_id = container
    scope = ROOT / "system.slice" / f"docker-{container_id}.scope"
    try:
        swap_before = _swap(scope)
        # vm id: the container's name
        supervisor = start_attach(hostd, tmp_path, f"docker:{name}", report_interval="2s")
        state = _state(tmp_path, name)
        assert Path(state["cgroup"]) == scope, state  # the systemd driver's scope on v2
        agent_pid = _ballooned(hostd, tmp_path, scope, name, swap_before, figures)
        _detached(hostd, tmp_path, scope, name, agent_pid, supervisor, figures)
        assert docker("inspect", "-f", "{{.State.Status}}", name) == "running", "detaching disturbed the container"
        figures["oom_kills"] = _oom_kills(scope)
        assert figures["oom_kills"] == 0

        # Attached again: the container stopping makes the agent leave, and Docker can remove its scope.
        supervisor = start_attach(hostd, tmp_path, f"docker:{name}", report_interval="2s")
        agent_pid = _state(tmp_path, name)["agent_pid"]
        hostd.wait_until(lambda s: any(v["vm_id"] == name and v["alive"] for v in s["vms"]), 180, "re-registered")
        stopped = time.monotonic()
        docker("stop", "-t", "10", name, timeout_s=120)
        assert supervisor.wait(timeout=120) == 0
        assert not Path(f"/proc/{agent_pid}").exists()
        wait(lambda: not scope.exists(), 60, f"{scope} removed")
        figures["agent_left_after_stop_s"] = round(time.monotonic() - stopped, 1)
    except BaseException:
        _keep_logs(hostd, tmp_path, "docker")
        raise
