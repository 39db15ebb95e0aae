"""Working-set sampling: the fraction of the guest's memory touched per period.

Method "referenced" (preferred): at the start of a period, write "1" to /proc/PID/clear_refs
of every process in the guest (clears the accessed bits of their anonymous and file pages);
at the end, sum `Referenced:` from /proc/PID/smaps_rollup (Linux ≥ 4.14). Needs permission to
write clear_refs (same user, or root in the container).
Method "active_lru" (fallback): the cgroup's active anon + active file LRU lists — the
kernel's own (slower-moving) idea of what is in use.

ESX samples pages uniformly over the VM's physical memory, so the ratio here is relative to
the guest's memory size (memsz), and the host computes active = ratio × memsz.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from guestagent.cgroup import CgroupReader, GuestReading

log = logging.getLogger(__name__)


def parse_referenced_bytes(smaps_rollup_text: str) -> int:
    """`Referenced:   1234 kB` → bytes (0 if absent)."""
    for line in smaps_rollup_text.splitlines():
        if line.startswith("Referenced:"):
            return int(line.split()[1]) * 1024
    return 0


def touched_ratio(touched_bytes: int, memsz_bytes: int) -> float:
    return 0.0 if memsz_bytes <= 0 else min(1.0, touched_bytes / memsz_bytes)


def active_lru_bytes(reading: GuestReading) -> int:
    return (reading.active_anon_bytes or 0) + (reading.active_file_bytes or 0)


SampleMethod = Literal["referenced", "active_lru"]  # idle-page bits, or the active LRU lists


@dataclass(frozen=True, slots=True)
class Sample:
    ratio: float
    method: SampleMethod
    period_ms: int


class WorkingSetSampler:
    """Runs the periods. `exclude_pids`: the agent itself (its balloon is not workload)."""

    def __init__(self, reader: CgroupReader, memsz_bytes: int, exclude_pids: set[int],
                 proc_root: Path = Path("/proc")) -> None:
        self._reader = reader
        self._memsz_bytes = memsz_bytes
        self._exclude = exclude_pids
        self._proc = proc_root
        self._referenced_works = True
        self._cleared_pids: list[int] = []
        self._period_started_ms: int | None = None

    def _guest_pids(self) -> list[int]:
        return [pid for pid in self._reader.pids() if pid not in self._exclude]

    def start_period(self, now_ms: int) -> None:
        self._period_started_ms = now_ms
        self._cleared_pids = []
        if not self._referenced_works:
            return
        for pid in self._guest_pids():
            try:
                (self._proc / str(pid) / "clear_refs").write_text("1")
                self._cleared_pids.append(pid)
            except FileNotFoundError:
                continue  # the process exited
            except OSError as exc:
                log.warning("cannot clear accessed bits of pid %d (%s): using the active LRU lists", pid, exc)
                self._referenced_works = False
                return

    def _referenced_total(self) -> int:
        total = 0
        for pid in self._cleared_pids:
            try:
                total += parse_referenced_bytes((self._proc / str(pid) / "smaps_rollup").read_text())
            except (FileNotFoundError, ProcessLookupError):
                continue
            except OSError as exc:
                log.warning("cannot read smaps_rollup of pid %d (%s): using the active LRU lists", pid, exc)
                self._referenced_works = False
                break
        return total

    def current(self, now_ms: int, reading: GuestReading) -> Sample | None:
        """The touched ratio so far in this period (None before the first period starts)."""
        if self._period_started_ms is None:
            return None
        period_ms = now_ms - self._period_started_ms
        if self._referenced_works and self._cleared_pids:
            touched = self._referenced_total()
            if self._referenced_works:
                return Sample(touched_ratio(touched, self._memsz_bytes), "referenced", period_ms)
        return Sample(touched_ratio(active_lru_bytes(reading), self._memsz_bytes), "active_lru", period_ms)

