"""`CgroupReader(path, version)` joins file names to one memory cgroup directory and is the
only code that reads its counters; the parsing is cgroups.parse's."""

from __future__ import annotations

import logging
from pathlib import Path

from cgroups import CGROUP_ROOT, CgroupError, memory_cgroup_path, memory_hierarchy, parse_proc_cgroup
from cgroups.parse import GuestReading, reading_from_v1, reading_from_v2

__all__ = ["CgroupReader", "memory_and_swap", "usage_of"]

log = logging.getLogger("guestagent.cgroup")  # the name the agent's log has always shown


_V1_FILES = (
    "memory.stat",
    "memory.usage_in_bytes",
    "memory.limit_in_bytes",
    "memory.oom_control",
    "memory.failcnt",
    "memory.memsw.limit_in_bytes",
)
_V2_FILES = ("memory.stat", "memory.current", "memory.max", "memory.events", "memory.pressure",
             "memory.swap.current", "memory.swap.max")
_REQUIRED = {1: ("memory.stat", "memory.usage_in_bytes", "memory.limit_in_bytes"),
             2: ("memory.stat", "memory.current", "memory.max")}


class CgroupReader:
    """Reads one memory cgroup directory. Missing optional files give None values and one
    warning (not one per read)."""

    def __init__(self, path: Path, version: int) -> None:
        if version not in (1, 2):
            raise CgroupError.at(str(path), f"cgroup version must be 1 or 2, not {version}")
        self.path = path
        self.version = version
        self._warned_missing: set[str] = set()

    @classmethod
    def detect(cls, cgroup_fs_root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup"),
               ) -> CgroupReader:
        """This process's own memory cgroup."""
        version, relative = parse_proc_cgroup(proc_cgroup.read_text())
        path = memory_cgroup_path(version, relative, cgroup_fs_root)
        if not path.is_dir():
            # Inside a container with a private cgroup namespace the path is "/" and the
            # cgroup is mounted at the root.
            path = memory_hierarchy(version, cgroup_fs_root)
        return cls(path, version)

    @classmethod
    def for_path(cls, path: Path) -> CgroupReader:
        """A given cgroup directory; the version is told by the files it has."""
        if (path / "memory.current").exists():
            return cls(path, 2)
        if (path / "memory.usage_in_bytes").exists():
            return cls(path, 1)
        raise CgroupError.at(str(path), "not a memory cgroup directory (no memory.current or memory.usage_in_bytes)")

    def _read_files(self) -> dict[str, str]:
        files: dict[str, str] = {}
        for name in _V1_FILES if self.version == 1 else _V2_FILES:
            try:
                files[name] = (self.path / name).read_text()
            except FileNotFoundError:
                if name in _REQUIRED[self.version]:
                    raise CgroupError.at(str(self.path / name), "required cgroup file is missing") from None
                if name not in self._warned_missing:
                    self._warned_missing.add(name)
                    log.warning("cgroup file %s missing: its values will be reported as unknown", self.path / name)
            except OSError as exc:
                raise CgroupError.at(str(self.path / name), str(exc)) from exc
        return files

    def read(self) -> GuestReading:
        files = self._read_files()
        try:
            return reading_from_v1(files) if self.version == 1 else reading_from_v2(files)
        except (KeyError, ValueError) as exc:
            raise CgroupError.at(str(self.path), f"unexpected cgroup file content: {exc}") from exc

    def pids(self) -> list[int]:
        try:
            return [int(line) for line in (self.path / "cgroup.procs").read_text().split()]
        except OSError as exc:
            raise CgroupError.at(str(self.path / "cgroup.procs"), str(exc)) from exc


def memory_and_swap(path: Path, version: int) -> dict[str, int | None]:
    """Memory and swap in use, bytes, from the usage files alone (v1: memory+swap minus
    memory); both None when the cgroup is gone or a file is unreadable."""
    try:
        if version == 1:
            memory = int((path / "memory.usage_in_bytes").read_text())
            memsw = int((path / "memory.memsw.usage_in_bytes").read_text())
            return {"memory_bytes": memory, "swap_bytes": max(0, memsw - memory)}
        return {"memory_bytes": int((path / "memory.current").read_text()),
                "swap_bytes": int((path / "memory.swap.current").read_text())}
    except (OSError, ValueError):
        return {"memory_bytes": None, "swap_bytes": None}


def usage_of(path: Path) -> tuple[int, int | None]:
    """(memory in use, swap in use or None when the cgroup does not account swap)."""
    try:
        reading = CgroupReader.for_path(path).read()
    except (CgroupError, OSError) as exc:
        raise CgroupError(f"{path}: {exc}", str(path)) from None
    return reading.usage_bytes, reading.swap_used_bytes
