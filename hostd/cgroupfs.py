"""The `cgroupfs` host backend (host-level reclamation, SPEC §3.4/§3.8): read a guest cgroup's
usage, read and write its memory limit and freeze or thaw it, on cgroup v1 or v2, by writing
the files directly. hostd lowers a limit to apply a swap target (the kernel then pages the
guest out without its help) and freezes guests in the low state (hostd/reclaim.py). The
`docker` backend (hostd/docker_backend.py) has the same methods, except `page_out` (blind host
swap, vswap_mode = "blind"), which only a cgroup target has.

Paths are relative to the hierarchy (e.g. "balloonlab-lab/web"): on v1 the memory and freezer
controllers are separate hierarchies with the same relative path. The cgroup files themselves
(reading, limits, freezing, the one error type) are the `cgroups` package's; this module keeps
the backend's names for them, which hostd and its tests import."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from pathlib import Path

from cgroups import CGROUP_ROOT, CgroupError, CgroupGone, memory_cgroup_version, memory_hierarchy, writer
from cgroups.reader import usage_of
from cgroups.writer import read_control_file, write_control_file
from hostd import pageout
from hostd.pageout import PageoutResult

# The host backends' errors are the cgroups package's one error type (a container is a cgroup too).
BackendError = CgroupError
TargetGone = CgroupGone  # the cgroup (or container) does not exist: there is nothing left to undo on it

__all__ = ["CGROUP_ROOT", "BackendError", "CgroupfsBackend", "TargetGone", "memory_cgroup_version",
           "memory_hierarchy", "read_control_file", "usage_of", "write_control_file"]


@dataclass(frozen=True, slots=True)
class CgroupfsBackend:
    root: Path = CGROUP_ROOT

    @property
    def version(self) -> int:
        return memory_cgroup_version(self.root)

    def _memory(self, cgroup: str) -> Path:
        relative = cgroup.strip("/")
        if not relative or ".." in Path(relative).parts:
            raise BackendError(f"cgroup {cgroup!r}: a path below the hierarchy's root")
        path = memory_hierarchy(self.version, self.root) / relative
        if not path.is_dir():
            raise TargetGone(f"cgroup {cgroup!r}: {path} does not exist")
        return path

    def usage_bytes(self, cgroup: str) -> tuple[int, int | None]:
        """(memory in use, swap in use or None when the cgroup does not account swap)."""
        return usage_of(self._memory(cgroup))

    # ---- memory limit ---------------------------------------------------------------------
    def limit_bytes(self, cgroup: str) -> int | None:
        return writer.memory_limit(self._memory(cgroup), self.version)

    def set_limit_bytes(self, cgroup: str, limit_bytes: int | None) -> None:
        """None = unlimited (the v1 memory+swap rule: cgroups.writer.set_memory_limit)."""
        if limit_bytes is not None and limit_bytes < 0:
            raise BackendError(f"limit {limit_bytes}: must be ≥ 0")
        writer.set_memory_limit(self._memory(cgroup), self.version, limit_bytes)

    # ---- blind host swap (vswap_mode = "blind") -------------------------------------------
    def page_out(self, cgroup: str, want_bytes: int, rng: random.Random | None = None) -> PageoutResult:
        """Page out `want_bytes` of the cgroup's processes' resident memory, pages chosen at
        random by hostd (hostd/pageout.py), not by the guest's LRU."""
        path = self._memory(cgroup)
        try:
            pids = [int(pid) for pid in read_control_file(path / "cgroup.procs").split()]
        except ValueError:
            raise BackendError(f"{path / 'cgroup.procs'}: not a list of pids") from None
        try:
            return pageout.page_out(pids, want_bytes, rng)
        except pageout.PageoutError as exc:
            raise BackendError(str(exc)) from None

    # ---- freezing -------------------------------------------------------------------------
    def _freezer(self, cgroup: str) -> Path:
        memory = self._memory(cgroup)
        if self.version == 2:
            return memory
        path = writer.v1_freezer(cgroup, self.root)
        if not (path / "freezer.state").exists():
            raise BackendError(f"cgroup {cgroup!r}: no v1 freezer cgroup at {path} (the guest must be in one)")
        return path

    def set_frozen(self, cgroup: str, frozen: bool) -> None:
        """Thawing a v1 cgroup with no freezer cgroup beside it does nothing (nothing there can
        be frozen); freezing one is an error."""
        if not frozen and self.version == 1:
            self._memory(cgroup)  # the path is checked (and a vanished cgroup is TargetGone)
            if not (writer.v1_freezer(cgroup, self.root) / "freezer.state").exists():
                return
        writer.set_frozen(self._freezer(cgroup), self.version, frozen)

    def frozen(self, cgroup: str) -> bool:
        """Whether every task is frozen (a freeze takes effect asynchronously)."""
        return writer.is_frozen(self._freezer(cgroup), self.version)

    def thaw_all(self, cgroups: list[str]) -> list[str]:
        """Best effort, for exit and crash recovery: thaw each, return those that failed."""
        failed = []
        for cgroup in cgroups:
            with contextlib.suppress(BackendError):
                self.set_frozen(cgroup, False)
                continue
            failed.append(cgroup)
        return failed
