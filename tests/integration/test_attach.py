"""`balloonctl attach` / `detach`: a balloon for a guest with no agent in it — a plain memory
cgroup and a Docker container started from a stock image — against a real hostd."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from guestagent.attach import AttachTarget, Limits, memory_cgroup_of, parse_target, refusal, vm_id_from
from tests.conftest import require, require_docker, require_root, require_swap
from tests.integration import cgroups as test_cgroups
from tests.integration.attach_helpers import HOLDER, attach_logs, left_with_bye, memory_stat, start_attach
from tests.integration.cgroups import memory_cgroup_version, vm_locked_bytes
from tests.integration.hostd_proc import HostdProcess, vm

MiB = 1 << 20
PAGES_PER_MiB = MiB // 4096
BASE_IMAGE = os.environ.get("BALLOONLAB_TEST_BASE_IMAGE", "balloonlab-base:bookworm")


# ---- pure parts: no root needed --------------------------------------------------------------
def test_targets_parse_and_refusals_say_why():
    assert parse_target("docker:web") == ("docker", "web")
    assert parse_target("pid:12") == ("pid", "12")
    with pytest.raises(Exception, match="docker:NAME"):
        parse_target("web")
    with pytest.raises(Exception, match="process id"):
        parse_target("pid:abc")
    assert memory_cgroup_of("4:memory:/docker/abc\n0::/\n") == (1, "/docker/abc")
    assert memory_cgroup_of("0::/system.slice/docker-abc.scope\n") == (2, "/system.slice/docker-abc.scope")
    assert vm_id_from("my app/1") == "my-app-1"
    target = AttachTarget("docker:web", "docker", Path("/sys/fs/cgroup/memory/docker/x"), 1, "web", 1)
    assert "no memory limit" in (refusal(target, Limits(None, None, True), 1 << 30, True) or "")
    assert "--memory-swap" in (refusal(target, Limits(256 * MiB, 0, True), 1 << 30, True) or "")
    assert "swapaccount=1" in (refusal(target, Limits(256 * MiB, None, False), 1 << 30, True) or "")
    assert "needs root" in (refusal(target, Limits(256 * MiB, 256 * MiB, True), 1 << 30, False) or "")
    assert "no swap enabled" in (refusal(target, Limits(256 * MiB, 256 * MiB, True), 0, True) or "")
    assert refusal(target, Limits(256 * MiB, 256 * MiB, True), 1 << 30, True) is None


# ---- real ------------------------------------------------------------------------------------
@pytest.fixture
def hostd(tmp_path: Path) -> Iterator[HostdProcess]:
    require_root()
    require_swap()
    require(memory_cgroup_version() is not None, "needs a mounted memory cgroup controller")
    process = HostdProcess(tmp_path, "--host-memory", "4GiB", "--report-interval", "500ms", "--http", "off",
                           "--vswap-state-file", str(tmp_path / "vswap.json"))
    yield process
    process.stop()


def _state(tmp_path: Path, vm_id: str, timeout_s: float = 15) -> dict:
    path = tmp_path / "attach" / f"{vm_id}.json"
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"no attach state {path}"
        time.sleep(0.05)
    return json.loads(path.read_text())


def _stop(processes: list[subprocess.Popen[str]]) -> None:
    """A failed test must not leave its attach supervisors (they deflate on SIGTERM) or its
    guest running: an un-waited Popen also turns into a warning in whichever test runs next."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# mlocked pages reach the unevictable LRU through per-CPU batches (up to 15 pages each): right
# after the mlock a few pages may still be counted elsewhere (seen: 13 pages short of 120 MiB).
LRU_BATCH_SLACK_BYTES = 1 * MiB


def _guest_swap(cgroup: Path) -> int:
    if (cgroup / "memory.swap.current").exists():
        return int((cgroup / "memory.swap.current").read_text())
    return memory_stat(cgroup).get("swap", 0)


def _balloon_to(hostd: HostdProcess, vm_id: str, mib: int) -> None:
    hostd.wait_until(lambda s: any(v["vm_id"] == vm_id and v["alive"] for v in s["vms"]), 20, f"{vm_id} registered")
    hostd.client.target(vm_id, mib * PAGES_PER_MiB)
    hostd.wait_until(lambda s: vm(s, vm_id)["balloon_bytes"] >= mib * MiB, 60, f"{vm_id}'s balloon at {mib} MiB")


@pytest.mark.integration
@pytest.mark.root
def test_plain_cgroup_is_ballooned_then_detached_then_followed_by_pid(hostd, tmp_path):
    cgroup = test_cgroups.TestCgroup(256 * MiB, 256 * MiB)
    started: list[subprocess.Popen[str]] = []
    try:
        holder = cgroup.python("-c", HOLDER.format(size=180), stdout=subprocess.PIPE)
        started.append(holder)
        assert holder.stdout.readline().strip() == "ready"
        swap_before = _guest_swap(cgroup.path)
        vm_id = f"plain-{uuid.uuid4().hex[:6]}"
        supervisor = start_attach(hostd, tmp_path, f"cgroup:{cgroup.path}", "--vm-id", vm_id)
        started.append(supervisor)
        agent_pid = _state(tmp_path, vm_id)["agent_pid"]
        _balloon_to(hostd, vm_id, 120)
        # The pinned pages are the guest's: unevictable in its cgroup, and its idle memory went to its swap.
        assert agent_pid in [int(p) for p in (cgroup.path / "cgroup.procs").read_text().split()]
        assert vm_locked_bytes(agent_pid) >= 120 * MiB
        assert memory_stat(cgroup.path)["unevictable"] >= 120 * MiB - LRU_BATCH_SLACK_BYTES
        swapped = _guest_swap(cgroup.path) - swap_before
        assert swapped >= 32 * MiB, f"only {swapped >> 20} MiB of the guest went to its swap"
        print(f"cgroup v{cgroup.version}: balloon 120 MiB, guest swap +{swapped >> 20} MiB")

        detach = hostd.ctl("detach", vm_id, "--state-dir", str(tmp_path / "attach"))
        assert detach.returncode == 0, detach.stderr
        assert supervisor.wait(timeout=30) == 0
        assert not Path(f"/proc/{agent_pid}").exists() or vm_locked_bytes(agent_pid) == 0
        assert memory_stat(cgroup.path)["unevictable"] < 4 * MiB, "pinned memory left behind"
        assert holder.poll() is None, "detaching disturbed the guest"
        assert cgroup.oom_kills() == 0
        hostd.wait_until(lambda s: left_with_bye(s, vm_id), 10, "the agent's bye")
        assert "said bye (read by the host)" in attach_logs(tmp_path), attach_logs(tmp_path)

        # Attached again, through the guest's process: its exit (a pidfd) makes the agent leave.
        supervisor = start_attach(hostd, tmp_path, f"pid:{holder.pid}", "--vm-id", vm_id)
        started.append(supervisor)
        assert Path(_state(tmp_path, vm_id)["cgroup"]) == cgroup.path
        agent_pid = _state(tmp_path, vm_id)["agent_pid"]
        _balloon_to(hostd, vm_id, 64)
        holder.kill()
        holder.wait()
        assert supervisor.wait(timeout=30) == 0
        assert not Path(f"/proc/{agent_pid}").exists()
        assert not (tmp_path / "attach" / f"{vm_id}.json").exists()
    except BaseException:
        print(attach_logs(tmp_path))
        raise
    finally:
        _stop(started)
        cgroup.destroy()


def _remove_stale_containers() -> None:
    """Containers of an interrupted earlier run (their pytest pid is gone)."""
    listed = subprocess.run(["docker", "ps", "-aq", "--filter", "label=balloonlab.test=attach", "--format",
                             '{{.ID}} {{.Label "balloonlab.test.pid"}}'], capture_output=True, text=True, timeout=30)
    for line in listed.stdout.splitlines():
        container, _, pid = line.partition(" ")
        if not pid.isdigit() or not Path(f"/proc/{pid}").exists():
            subprocess.run(["docker", "rm", "-f", container], capture_output=True, timeout=60)


@pytest.fixture
def container() -> Iterator[str]:
    require_docker()
    require(subprocess.run(["docker", "image", "inspect", BASE_IMAGE], capture_output=True).returncode == 0,
            f"needs the offline base image {BASE_IMAGE} (scripts/build-base-image.sh)")
    _remove_stale_containers()
    name = f"balloonlab-attach-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["docker", "run", "-d", "--name", name, "--label", "balloonlab.test=attach", "--label",
                    f"balloonlab.test.pid={os.getpid()}", "--memory", "256m", "--memory-swap", "512m",
                    "--network", "none", BASE_IMAGE, "python3", "-c", HOLDER.format(size=180)],
                   check=True, capture_output=True, timeout=60)
    deadline = time.monotonic() + 30
    while "ready" not in subprocess.run(["docker", "logs", name], capture_output=True, text=True).stdout:
        assert time.monotonic() < deadline, "the container's service never got ready"
        time.sleep(0.2)
    yield name
    subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)


@pytest.mark.integration
@pytest.mark.root
@pytest.mark.e2e
def test_container_without_agent_is_ballooned_and_its_stop_ends_the_agent(hostd, tmp_path, container):
    started: list[subprocess.Popen[str]] = []
    try:
        supervisor = start_attach(hostd, tmp_path, f"docker:{container}")  # vm id: the container's name
        started.append(supervisor)
        state = _state(tmp_path, container)
        cgroup, agent_pid = Path(state["cgroup"]), state["agent_pid"]
        swap_before = _guest_swap(cgroup)
        _balloon_to(hostd, container, 120)
        assert vm_locked_bytes(agent_pid) >= 120 * MiB
        unevictable = memory_stat(cgroup)["unevictable"]
        assert unevictable >= 120 * MiB - LRU_BATCH_SLACK_BYTES
        swapped = _guest_swap(cgroup) - swap_before
        assert swapped >= 32 * MiB, f"only {swapped >> 20} MiB of the container went to its swap"
        print(f"container {cgroup}: unevictable {unevictable >> 20} MiB, swap +{swapped >> 20} MiB")

        subprocess.run(["docker", "stop", "-t", "5", container], check=True, capture_output=True, timeout=60)
        assert supervisor.wait(timeout=30) == 0
        assert not Path(f"/proc/{agent_pid}").exists()
        # Docker could remove the container's cgroup: the agent had left it.
        deadline = time.monotonic() + 10
        while cgroup.exists():
            assert time.monotonic() < deadline, f"{cgroup} left behind"
            time.sleep(0.1)
        hostd.wait_until(lambda s: left_with_bye(s, container), 10, "the agent's bye")
    except BaseException:
        print(attach_logs(tmp_path))
        raise
    finally:
        _stop(started)


def _become_nobody() -> None:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)


@pytest.mark.integration
@pytest.mark.root
def test_refusals_name_what_cannot_work(hostd, tmp_path):
    unlimited = test_cgroups.TestCgroup(1 << 62, 0)
    no_swap = test_cgroups.TestCgroup(256 * MiB, 0)
    limited = test_cgroups.TestCgroup(256 * MiB, 256 * MiB)
    try:
        if unlimited.version == 1:
            (unlimited.path / "memory.memsw.limit_in_bytes").write_text("-1")
            (unlimited.path / "memory.limit_in_bytes").write_text("-1")
        else:
            (unlimited.path / "memory.max").write_text("max")
        # (the second one named relative to the memory hierarchy)
        for target, cgroup, expected in ((f"cgroup:{unlimited.path}", unlimited, "no memory limit"),
                                         (f"cgroup:{no_swap.path.name}", no_swap, "may use no swap")):
            sleeper = cgroup.spawn(["sleep", "60"])
            result = start_attach(hostd, tmp_path, target, "--vm-id", "refused")
            assert result.wait(timeout=30) == 1
            assert expected in attach_logs(tmp_path), attach_logs(tmp_path)
            sleeper.kill()
        # Not root: the cgroup cannot be joined (the system's python3: the test's may be in root's home).
        python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
        nobody = subprocess.run([python, "-m", "guestagent.attach", f"cgroup:{limited.path}",
                                 "--state-dir", str(tmp_path / "nobody")], capture_output=True, text=True,
                                timeout=30, preexec_fn=_become_nobody, cwd="/",
                                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
        assert nobody.returncode == 1 and "no permission" in nobody.stderr, nobody.stderr
        missing = hostd.ctl("attach", "pid:999999999")
        assert missing.returncode == 1 and "no process" in missing.stderr
        with contextlib.suppress(FileNotFoundError):
            assert not list((tmp_path / "attach").glob("*.json"))
    finally:
        for cgroup in (unlimited, no_swap, limited):
            cgroup.destroy()
