"""Real memory cgroups for tests (v1 here; v2 on hosts that mount it): create with a limit
and a swap allowance, run processes inside, read counters, and always clean up."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import cgroups
from cgroups import CgroupError, writer
from cgroups.parse import parse_flat_keyed
from cgroups.reader import CgroupReader

ROOT = Path("/sys/fs/cgroup")


def memory_cgroup_version() -> int | None:
    try:
        return cgroups.memory_cgroup_version(ROOT)
    except CgroupError:
        return None


class TestCgroup:
    """A memory cgroup made for one test. `swap_bytes=0` forbids swap."""

    def __init__(self, limit_bytes: int, swap_bytes: int, name: str | None = None) -> None:
        self.version = memory_cgroup_version()
        if self.version is None:
            raise RuntimeError("no memory cgroup controller mounted")
        self.path = writer.create_guest(cgroups.memory_hierarchy(self.version, ROOT), self.version,
                                        name or f"balloonlab-test-{uuid.uuid4().hex[:8]}", limit_bytes, swap_bytes)
        self.processes: list[subprocess.Popen[str]] = []
        self.logs: list[Path] = []
        self.reader = CgroupReader(self.path, self.version)

    def spawn(self, argv: list[str], **kwargs: object) -> subprocess.Popen[str]:
        """Start argv inside the cgroup (it joins before exec, so every page is charged here)."""
        procs = self.path / "cgroup.procs"
        launcher = f'echo $$ > "{procs}" && exec "$@"'
        process = subprocess.Popen(["sh", "-c", launcher, "sh", *argv], text=True, **kwargs)  # type: ignore[call-overload]
        self.processes.append(process)
        return process

    def python(self, *args: str, **kwargs: object) -> subprocess.Popen[str]:
        return self.spawn([sys.executable, *args], **kwargs)

    def stat(self) -> dict[str, int]:
        return parse_flat_keyed((self.path / "memory.stat").read_text())

    def swap_bytes(self) -> int:
        reading = self.reader.read()
        return reading.swap_used_bytes or 0

    def major_faults(self) -> int:
        return self.reader.read().major_faults or 0

    def usage_bytes(self) -> int:
        return self.reader.read().usage_bytes

    def oom_kills(self) -> int:
        reading = self.reader.read()
        return (reading.oom_kill_events or 0)

    def destroy(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
        writer.remove(self.path)


def vm_locked_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1]) * 1024
    return 0


def oom_kill_count(path: Path, version: int) -> int:
    name = "memory.oom_control" if version == 1 else "memory.events"
    return parse_flat_keyed((path / name).read_text()).get("oom_kill", 0)


# ---- guest trees for host-swap tests: a memory parent (and, on v1, a freezer parent) ----------
FREEZER_ROOT = ROOT / "freezer"


def thaw_tree(path: Path) -> None:
    """Thaw a v1 freezer tree: killed tasks in a frozen cgroup do not die until thawed."""
    for state in sorted(path.rglob("freezer.state"), reverse=True):
        with contextlib.suppress(OSError):
            state.write_text("THAWED")


def remove_tree(path: Path, timeout_s: float = 10.0) -> None:
    """Thaw (a freezer tree), kill what runs inside, and remove, children first."""
    if not path.exists():
        return
    if path.is_relative_to(FREEZER_ROOT):
        thaw_tree(path)
    writer.remove(path, timeout_s)


def remove_stale_trees(prefix: str) -> list[Path]:
    """Trees named PREFIX-PID-… whose test process is gone (an interrupted earlier run, even a
    kill -9 of pytest): thawed, emptied and removed. Trees of a live run are left alone."""
    stale = []
    for hierarchy in (FREEZER_ROOT, ROOT / "memory", ROOT):  # freezers first: thawed before the kills
        if not hierarchy.is_dir():
            continue
        for path in hierarchy.glob(f"{prefix}-*"):
            pid = path.name.removeprefix(f"{prefix}-").split("-")[0]
            if path.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
                stale.append(path)
    for path in stale:
        if path.is_relative_to(FREEZER_ROOT):
            thaw_tree(path)
    for path in stale:
        remove_tree(path)
    return stale


class GuestTree:
    """Guests for hostd to squeeze: PREFIX-PID-RANDOM/NAME in the memory hierarchy and, for those
    that ask for one, a v1 freezer cgroup at the same relative path. Stale trees of earlier
    runs are removed first; `destroy()` thaws, kills and removes everything."""

    def __init__(self, prefix: str) -> None:
        version = memory_cgroup_version()
        if version is None:
            raise RuntimeError("no memory cgroup controller mounted")
        self.version = version
        self.stale_removed = remove_stale_trees(prefix)
        self.name = f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.memory = writer.create_parent(version, self.name, ROOT)
        self.freezer: Path | None = None
        self.processes: list[subprocess.Popen[bytes]] = []

    def relative(self, guest: str) -> str:
        return f"{self.name}/{guest}"

    def add(self, guest: str, limit_bytes: int, swap_bytes: int, freezer: bool) -> Path:
        path = writer.create_guest(self.memory, self.version, guest, limit_bytes, swap_bytes)
        if self.version == 1 and freezer:
            if not FREEZER_ROOT.is_dir():
                raise RuntimeError("no v1 freezer hierarchy mounted")
            self.freezer = FREEZER_ROOT / self.name
            (self.freezer / guest).mkdir(parents=True, exist_ok=True)
        return path

    def freezer_of(self, guest: str) -> Path | None:
        path = FREEZER_ROOT / self.name / guest
        return path if self.version == 1 and path.is_dir() else None

    def spawn(self, guest: str, argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """argv in the guest's memory (and freezer) cgroup, joined before exec."""
        procs = [self.memory / guest / "cgroup.procs"]
        freezer = self.freezer_of(guest)
        if freezer is not None:
            procs.append(freezer / "cgroup.procs")

        def join() -> None:
            for path in procs:
                path.write_text(str(os.getpid()))

        process = subprocess.Popen(argv, preexec_fn=join, **kwargs)  # type: ignore[call-overload]
        self.processes.append(process)
        return process

    # what a test checks: the guest's own limits, and not frozen
    def limits(self, guest: str) -> tuple[int, int | None]:
        """(memory limit, memory+swap limit or None on v2)."""
        path = self.memory / guest
        if self.version == 1:
            return (int((path / "memory.limit_in_bytes").read_text()),
                    int((path / "memory.memsw.limit_in_bytes").read_text()))
        text = (path / "memory.max").read_text().strip()
        return (1 << 62 if text == "max" else int(text)), None

    def frozen(self, guest: str) -> bool:
        if self.version == 2:
            return (self.memory / guest / "cgroup.freeze").read_text().strip() == "1"
        freezer = self.freezer_of(guest)
        return freezer is not None and (freezer / "freezer.state").read_text().strip() != "THAWED"

    def destroy(self) -> None:
        if self.freezer is not None:
            thaw_tree(self.freezer)
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        remove_tree(self.memory)
        if self.freezer is not None:
            remove_tree(self.freezer)
