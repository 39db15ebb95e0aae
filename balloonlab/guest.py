"""A guest of a `Lab`: a memory cgroup running a command beside an agent, or a container /
cgroup / process the lab attached a balloon to. What a test does to it (squeeze, target,
shares, stop) and what it asserts on (`facts()`)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cgroups import CgroupError
from cgroups.parse import GuestReading
from cgroups.reader import CgroupReader
from protocol.limits import PAGE_SIZE_BYTES
from protocol.units import parse_size_bytes

if TYPE_CHECKING:
    from balloonlab.lab import Lab

Size = int | str  # bytes, or "256MiB"


def to_bytes(size: Size) -> int:
    return size if isinstance(size, int) else parse_size_bytes(size)


@dataclass(frozen=True, slots=True)
class Facts:
    """The guest now. Counters (oom_kills, major_faults, refaults, swap_in/out_pages) count
    from when the lab added the guest; None where the kernel does not say (e.g. swap in/out
    counts on cgroup v1)."""

    vm_id: str
    t_s: float  # seconds since the lab started
    registered: bool  # its agent is registered with hostd
    agent_state: str
    memsz_bytes: int
    balloon_bytes: int
    balloon_target_bytes: int
    alloc_target_bytes: int  # hostd's SZTGT for it
    usage_bytes: int | None
    swap_bytes: int | None  # the guest's memory in swap now
    unevictable_bytes: int | None  # mostly the balloon's pinned pages
    oom_kills: int | None
    major_faults: int | None
    refaults: int | None  # swapped pages needed again (workingset_refault_anon)
    swap_in_pages: int | None
    swap_out_pages: int | None
    workload: dict[str, Any] = field(default_factory=dict)  # the workload's own report, where there is one

    @property
    def balloon_mib(self) -> float:
        return self.balloon_bytes / (1 << 20)

    @property
    def swap_mib(self) -> float:
        return (self.swap_bytes or 0) / (1 << 20)


@dataclass(frozen=True, slots=True)
class Squeeze:
    """What `Guest.squeeze` achieved: the agent may refuse part of a target to spare the
    guest an OOM kill (it then holds what it could), which is a result, not an error."""

    wanted_balloon_bytes: int
    balloon_bytes: int
    seconds: float

    @property
    def reached(self) -> bool:
        return self.balloon_bytes >= self.wanted_balloon_bytes


def _delta(now: int | None, base: int | None) -> int | None:
    if now is None:
        return None
    return now - (base or 0)


class Guest:
    """Made by `Lab.guest(...)` or `Lab.attach(...)`; not built by hand."""

    def __init__(self, lab: Lab, vm_id: str, cgroup: Path, kind: str, process: subprocess.Popen[bytes],
                 report_file: Path | None, log_file: Path) -> None:
        self.lab = lab
        self.vm_id = vm_id
        self.cgroup = cgroup
        self.kind = kind  # "cgroup" (command + agent in a cgroup the lab made) or "attached"
        self.process = process  # the supervisor: balloon-guest or the attach supervisor
        self.report_file = report_file
        self.log_file = log_file
        self._reader: CgroupReader | None = None
        self._baseline: GuestReading | None = None
        with contextlib.suppress(CgroupError, OSError):
            self._reader = CgroupReader.for_path(cgroup)
            self._baseline = self._reader.read()

    def __repr__(self) -> str:
        return f"Guest({self.vm_id!r}, {self.kind}, {self.cgroup})"

    # ---- reading ----------------------------------------------------------------------------
    def status(self) -> dict[str, Any] | None:
        """hostd's entry for this vm (None while it is not registered)."""
        snapshot = self.lab.status()
        return next((vm for vm in snapshot["vms"] if vm["vm_id"] == self.vm_id), None)

    def reading(self) -> GuestReading | None:
        if self._reader is None:
            return None
        try:
            return self._reader.read()
        except (CgroupError, OSError):
            return None

    def workload_report(self) -> dict[str, Any]:
        """The workload's own report file (balloon-workload's format), {} if none."""
        if self.report_file is None:
            return {}
        try:
            report = json.loads(self.report_file.read_text())
        except (OSError, ValueError):
            return {}
        return report if isinstance(report, dict) else {}

    def facts(self, status: dict[str, Any] | None = None) -> Facts:
        vm = status if status is not None else (self.status() or {})
        reading, base = self.reading(), self._baseline
        oom = major = refaults = swap_in = swap_out = None
        if reading is not None:
            oom = _delta(reading.oom_kill_events, base.oom_kill_events if base else None)
            major = _delta(reading.major_faults, base.major_faults if base else None)
            refaults = _delta(reading.refault_anon_pages, base.refault_anon_pages if base else None)
            swap_in = _delta(reading.swap_in_pages, base.swap_in_pages if base else None)
            swap_out = _delta(reading.swap_out_pages, base.swap_out_pages if base else None)
        workload = self.workload_report() or {k: v for k, v in (vm.get("workload") or {}).items() if v is not None}
        return Facts(
            vm_id=self.vm_id, t_s=round(self.lab.elapsed_s(), 3), registered=bool(vm.get("alive")),
            agent_state=str(vm.get("agent_state", "absent")), memsz_bytes=int(vm.get("memsz_bytes") or 0),
            balloon_bytes=int(vm.get("balloon_bytes") or 0),
            balloon_target_bytes=int(vm.get("balloon_target_bytes") or 0),
            alloc_target_bytes=int(vm.get("alloc_target_bytes") or 0),
            usage_bytes=reading.usage_bytes if reading else None,
            swap_bytes=reading.swap_used_bytes if reading else None,
            unevictable_bytes=reading.unevictable_bytes if reading else None,
            oom_kills=oom, major_faults=major, refaults=refaults, swap_in_pages=swap_in, swap_out_pages=swap_out,
            workload=workload)

    @property
    def memsz_bytes(self) -> int:
        vm = self.status()
        if vm is not None:
            return int(vm["memsz_bytes"])
        reading = self.reading()
        return reading.limit_bytes or 0 if reading else 0

    @property
    def running(self) -> bool:
        """The supervisor (and so the agent) is still running."""
        return self.process.poll() is None

    # ---- acting -----------------------------------------------------------------------------
    def target(self, balloon: Size | None) -> None:
        """Pin the balloon at this size (bytes or "128MiB"); None hands it back to the policy."""
        pages = None if balloon is None else to_bytes(balloon) // PAGE_SIZE_BYTES
        self.lab.client.target(self.vm_id, pages)
        self.lab.mark(f"{self.vm_id} target {'auto' if balloon is None else _mib(to_bytes(balloon))}")

    def squeeze(self, to: Size, timeout: float = 60.0, wait: bool = True) -> Squeeze:
        """Balloon the guest down so that `to` of its memory is left to it (memsz − balloon),
        and wait until the balloon holds that much or `timeout` passes."""
        memsz = self.memsz_bytes
        wanted = max(0, memsz - to_bytes(to))
        started = time.monotonic()
        self.lab.client.target(self.vm_id, wanted // PAGE_SIZE_BYTES)
        self.lab.mark(f"squeeze {self.vm_id} to {_mib(to_bytes(to))}")
        balloon = 0
        while True:
            balloon = self.facts().balloon_bytes
            if not wait or balloon >= wanted // PAGE_SIZE_BYTES * PAGE_SIZE_BYTES \
                    or time.monotonic() - started > timeout:
                return Squeeze(wanted // PAGE_SIZE_BYTES * PAGE_SIZE_BYTES, balloon, time.monotonic() - started)
            time.sleep(0.2)

    def release(self, timeout: float = 30.0) -> None:
        """Deflate to nothing and keep it there (pinned at 0)."""
        self.target(0)
        self.wait_until(lambda f: f.balloon_bytes == 0, timeout, f"{self.vm_id}'s balloon to deflate")

    def shares(self, value: int | str) -> None:
        """low, normal, high or a number."""
        self.lab.client.set_vm(self.vm_id, shares=value)
        self.lab.mark(f"{self.vm_id} shares {value}")

    def set(self, **params: int | str | None) -> None:
        """hostd's vm settings: shares, reservation_bytes, limit_bytes, maxmemctl_bytes."""
        self.lab.client.set_vm(self.vm_id, **params)
        self.lab.mark(f"{self.vm_id} set {params}")

    def wait_until(self, predicate: Callable[[Facts], bool], timeout: float = 30.0, what: str = "the condition"
                   ) -> Facts:
        """Poll `facts()` until predicate(facts) is true; TimeoutError naming `what` and the last facts."""
        deadline = time.monotonic() + timeout
        while True:
            facts = self.facts()
            if predicate(facts):
                return facts
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.vm_id}: timed out after {timeout:g} s waiting for {what}; last: {facts}")
            time.sleep(0.2)

    def agent_pid(self) -> int | None:
        """The agent's process (for tests that kill it)."""
        if self.kind == "attached":
            with contextlib.suppress(OSError, ValueError, KeyError):
                state = json.loads((self.lab.attach_state_dir / f"{self.vm_id}.json").read_text())
                return int(state["agent_pid"])
            return None
        with contextlib.suppress(OSError):
            for pid in (self.cgroup / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    if argv[1:3] == [b"-m", b"guestagent"]:
                        return int(pid)
        return None

    def kill_agent(self, signum: int = signal.SIGKILL) -> bool:
        """Kill the agent (by default without a chance to deflate): the kernel frees its pages."""
        pid = self.agent_pid()
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
        self.lab.mark(f"{self.vm_id} agent killed ({signal.Signals(signum).name})")
        return True

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the guest's agent (it deflates and says bye) and, for a lab-made guest, its command."""
        self.request_stop()
        self.wait_stopped(timeout)

    def request_stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # the supervisor stops the agent first, then the rest

    def wait_stopped(self, timeout: float = 30.0) -> None:
        if self.process.returncode is not None:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.lab.mark(f"{self.vm_id} stopped")


def _mib(size: int) -> str:
    return f"{size / (1 << 20):g}MiB"
