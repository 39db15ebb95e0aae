"""Linux memory cgroups, v1 and v2: the one home of what the project knows about them, used by
the agent, hostd and the lab (it imports nothing of theirs).

    cgroups            CgroupError, CgroupGone, CGROUP_ROOT, UNLIMITED_V1_BYTES, which version
                       is mounted, where the memory hierarchy is, /proc/PID/cgroup, the host's
                       swap (every cgroup's swap limit draws on it)
    cgroups.parse      pure parsers of the files' text → GuestReading, Pressure, limits
    cgroups.reader     CgroupReader(path, version): the only reads of a cgroup's counters
    cgroups.writer     control files: limits, freeze/thaw, create/remove

Paths below a hierarchy are relative to it (e.g. "balloonlab-lab/web"): on v1 the memory and
freezer controllers are separate hierarchies with the same relative path.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CGROUP_ROOT", "UNLIMITED_V1_BYTES", "CgroupError", "CgroupGone", "docker_cgroup_paths",
           "host_swap_total_bytes", "memory_cgroup_path", "memory_cgroup_version", "memory_hierarchy",
           "parse_proc_cgroup"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
UNLIMITED_V1_BYTES = 1 << 62  # v1 reports "no limit" as a huge page-aligned number (~2^63)


class CgroupError(RuntimeError):
    """A cgroup file is missing, unreadable, unwritable or holds what it should not; the
    message says which file and why. `path` is that file (or directory) when one is known."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path

    @classmethod
    def at(cls, path: object, detail: str) -> CgroupError:
        """The `PATH: DETAIL` form."""
        return cls(f"{path}: {detail}", str(path))


class CgroupGone(CgroupError):
    """The cgroup (or container) does not exist: there is nothing left to undo on it."""


def parse_proc_cgroup(text: str, source: str = "/proc/self/cgroup") -> tuple[int, str]:
    """(version, path below the hierarchy) of the memory cgroup in a /proc/PID/cgroup: a v1
    line naming the `memory` controller wins (a hybrid host has both); otherwise the v2 `0::`
    line. Lines that are not `ID:CONTROLLERS:PATH` are skipped."""
    unified = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if "memory" in controllers.split(","):
            return 1, path
        if hierarchy == "0" and controllers == "":
            unified = path
    if unified is None:
        raise CgroupError.at(source, "no memory cgroup found")
    return 2, unified


def host_swap_total_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    """The host's swap space (SwapTotal; 0 without swap or when meminfo cannot be read)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("SwapTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def memory_cgroup_version(root: Path = CGROUP_ROOT) -> int:
    """The version of the mounted memory controller: 1 when v1's memory hierarchy is mounted
    (on a hybrid host too), 2 when the unified hierarchy has the memory controller."""
    if (root / "memory" / "memory.limit_in_bytes").exists():
        return 1
    controllers = root / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        return 2
    raise CgroupError(f"no memory cgroup controller under {root} (v1 {root}/memory or v2 with 'memory')", str(root))


def memory_hierarchy(version: int, root: Path = CGROUP_ROOT) -> Path:
    """The directory the memory cgroups of that version live under."""
    return root / "memory" if version == 1 else root


def docker_cgroup_paths(container_id: str, root: Path = CGROUP_ROOT) -> tuple[Path, ...]:
    """Where a Docker container's memory cgroup may be, in the order to try: v1 cgroupfs
    driver, v1 systemd driver, v2 cgroupfs driver, v2 systemd driver."""
    return (root / "memory" / "docker" / container_id,
            root / "memory" / "system.slice" / f"docker-{container_id}.scope",
            root / "docker" / container_id,
            root / "system.slice" / f"docker-{container_id}.scope")


def memory_cgroup_path(version: int, relative: str, root: Path = CGROUP_ROOT) -> Path:
    """A path from /proc/PID/cgroup (or one relative to the hierarchy) as a directory."""
    return memory_hierarchy(version, root) / relative.lstrip("/")
