"""Real memory cgroups for tests (v1 here; v2 on hosts that mount it): create with a limit
and a swap allowance, run processes inside, read counters, and always clean up."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from guestagent.cgroup import CgroupReader, parse_flat_keyed
from hostd import cgroupfs

ROOT = Path("/sys/fs/cgroup")


def memory_cgroup_version() -> int | None:
    try:
        return cgroupfs.memory_cgroup_version(ROOT)
    except cgroupfs.BackendError:
        return None


class TestCgroup:
    """A memory cgroup made for one test. `swap_bytes=0` forbids swap."""

    def __init__(self, limit_bytes: int, swap_bytes: int, name: str | None = None) -> None:
        self.version = memory_cgroup_version()
        if self.version is None:
            raise RuntimeError("no memory cgroup controller mounted")
        base = ROOT / "memory" if self.version == 1 else ROOT
        self.path = base / (name or f"balloonlab-test-{uuid.uuid4().hex[:8]}")
        self.path.mkdir()
        self.processes: list[subprocess.Popen[str]] = []
        self.logs: list[Path] = []
        if self.version == 1:
            (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes + swap_bytes))
            (self.path / "memory.swappiness").write_text("60")
        else:
            (self.path / "memory.max").write_text(str(limit_bytes))
            (self.path / "memory.swap.max").write_text(str(swap_bytes))
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
        deadline = time.monotonic() + 10
        while True:
            try:
                for pid in (self.path / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def vm_locked_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1]) * 1024
    return 0


def oom_kill_count(path: Path, version: int) -> int:
    name = "memory.oom_control" if version == 1 else "memory.events"
    return parse_flat_keyed((path / name).read_text()).get("oom_kill", 0)
