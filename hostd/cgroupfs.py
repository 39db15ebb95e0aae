"""The `cgroupfs` host backend (host-level reclamation, SPEC §3.4/§3.8): read a guest cgroup's
usage, read and write its memory limit and freeze or thaw it, on cgroup v1 or v2, by writing
the files directly. hostd lowers a limit to apply a swap target (the kernel then pages the
guest out without its help) and freezes guests in the low state (hostd/reclaim.py). The
`docker` backend (hostd/docker_backend.py) has the same methods, except `page_out` (blind host
swap, vswap_mode = "blind"), which only a cgroup target has.

Paths are relative to the hierarchy (e.g. "balloonlab-lab/web"): on v1 the memory and freezer
controllers are separate hierarchies with the same relative path."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from pathlib import Path

from guestagent.cgroup import CgroupReader, parse_flat_keyed
from guestagent.errors import CgroupError
from hostd import pageout
from hostd.pageout import PageoutResult

UNLIMITED_V1 = 1 << 62  # v1 reports "no limit" as a huge page-aligned number


CGROUP_ROOT = Path("/sys/fs/cgroup")


class BackendError(RuntimeError):
    """The backend cannot do what was asked; the message says which file and why."""


class TargetGone(BackendError):
    """The cgroup (or container) does not exist: there is nothing left to undo on it."""


# ---- cgroupfs primitives (also the cgroup lab's: lab/cgroups.py) --------------------------------
def memory_cgroup_version(root: Path = CGROUP_ROOT) -> int:
    if (root / "memory" / "memory.limit_in_bytes").exists():
        return 1
    controllers = root / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        return 2
    raise BackendError(f"no memory cgroup controller under {root} (v1 {root}/memory or v2 with 'memory')")


def memory_hierarchy(version: int, root: Path = CGROUP_ROOT) -> Path:
    return root / "memory" if version == 1 else root


def read_control_file(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise BackendError(f"cannot read {path}: {exc.strerror}") from None


def write_control_file(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except PermissionError:
        raise BackendError(f"permission denied writing {path}: this needs root") from None
    except OSError as exc:
        # e.g. EBUSY on v1: the kernel could not reclaim down to a lower limit
        raise BackendError(f"cannot write {value!r} to {path}: {exc.strerror}") from None


def usage_of(path: Path) -> tuple[int, int | None]:
    try:
        reading = CgroupReader.for_path(path).read()
    except (CgroupError, OSError) as exc:
        raise BackendError(f"{path}: {exc}") from None
    return reading.usage_bytes, reading.swap_used_bytes


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
        path = self._memory(cgroup)
        name = "memory.limit_in_bytes" if self.version == 1 else "memory.max"
        text = read_control_file(path / name)
        if self.version == 2 and text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            raise BackendError(f"{path / name}: {text[:40]!r} is not a number") from None
        return None if self.version == 1 and value >= UNLIMITED_V1 else value

    def set_limit_bytes(self, cgroup: str, limit_bytes: int | None) -> None:
        """None = unlimited. On v1 the memory+swap limit must stay ≥ the memory limit, so it
        is raised first when the new limit would pass it (and never lowered here: the guest's
        own swap allowance is not the host's to take)."""
        if limit_bytes is not None and limit_bytes < 0:
            raise BackendError(f"limit {limit_bytes}: must be ≥ 0")
        path = self._memory(cgroup)
        if self.version == 2:
            write_control_file(path / "memory.max", "max" if limit_bytes is None else str(limit_bytes))
            return
        memsw = path / "memory.memsw.limit_in_bytes"
        wanted = -1 if limit_bytes is None else limit_bytes
        if memsw.exists():
            try:
                memsw_limit = int(read_control_file(memsw))
            except ValueError:
                raise BackendError(f"{memsw}: not a number") from None
            if limit_bytes is None or limit_bytes > memsw_limit:
                write_control_file(memsw, str(wanted))
        write_control_file(path / "memory.limit_in_bytes", str(wanted))

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
        path = self.root / "freezer" / cgroup.strip("/")
        if not (path / "freezer.state").exists():
            raise BackendError(f"cgroup {cgroup!r}: no v1 freezer cgroup at {path} (the guest must be in one)")
        return path

    def set_frozen(self, cgroup: str, frozen: bool) -> None:
        """Thawing a v1 cgroup with no freezer cgroup beside it does nothing (nothing there can
        be frozen); freezing one is an error."""
        if not frozen and self.version == 1:
            self._memory(cgroup)  # the path is checked (and a vanished cgroup is TargetGone)
            if not (self.root / "freezer" / cgroup.strip("/") / "freezer.state").exists():
                return
        path = self._freezer(cgroup)
        if self.version == 2:
            write_control_file(path / "cgroup.freeze", "1" if frozen else "0")
        else:
            write_control_file(path / "freezer.state", "FROZEN" if frozen else "THAWED")

    def frozen(self, cgroup: str) -> bool:
        """Whether every task is frozen (a freeze takes effect asynchronously)."""
        path = self._freezer(cgroup)
        if self.version == 2:
            return parse_flat_keyed(read_control_file(path / "cgroup.events")).get("frozen") == 1
        return read_control_file(path / "freezer.state") == "FROZEN"

    def thaw_all(self, cgroups: list[str]) -> list[str]:
        """Best effort, for exit and crash recovery: thaw each, return those that failed."""
        failed = []
        for cgroup in cgroups:
            with contextlib.suppress(BackendError):
                self.set_frozen(cgroup, False)
                continue
            failed.append(cgroup)
        return failed
