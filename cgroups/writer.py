"""Control files of memory cgroups, v1 and v2: read and write one file with errors that name
it, the memory limit (and v1's memory+swap limit beside it), freezing, and making and removing
cgroups (the lab's: a parent with one child per guest, limits for memory and memory + swap).
Every failure is a CgroupError."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from cgroups import CGROUP_ROOT, UNLIMITED_V1_BYTES, CgroupError, memory_hierarchy
from cgroups.parse import parse_flat_keyed

__all__ = ["create_guest", "create_parent", "is_frozen", "memory_limit", "pids_in", "read_control_file", "remove",
           "set_frozen", "set_memory_limit", "v1_freezer", "write_control_file"]


def read_control_file(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise CgroupError(f"cannot read {path}: {exc.strerror}", str(path)) from None


def write_control_file(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except PermissionError:
        raise CgroupError(f"permission denied writing {path}: this needs root", str(path)) from None
    except OSError as exc:
        # e.g. EBUSY on v1: the kernel could not reclaim down to a lower limit
        raise CgroupError(f"cannot write {value!r} to {path}: {exc.strerror}", str(path)) from None


# ---- memory limit -----------------------------------------------------------------------------
def memory_limit(path: Path, version: int) -> int | None:
    """The memory limit of the cgroup directory `path`; None = unlimited (v2 `max`, v1's huge
    sentinel)."""
    name = "memory.limit_in_bytes" if version == 1 else "memory.max"
    text = read_control_file(path / name)
    if version == 2 and text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        raise CgroupError(f"{path / name}: {text[:40]!r} is not a number", str(path / name)) from None
    return None if version == 1 and value >= UNLIMITED_V1_BYTES else value


def set_memory_limit(path: Path, version: int, limit_bytes: int | None) -> None:
    """None = unlimited. On v1 the memory+swap limit must stay ≥ the memory limit, so it
    is raised first when the new limit would pass it (and never lowered here: the guest's
    own swap allowance is not the host's to take)."""
    if limit_bytes is not None and limit_bytes < 0:
        raise CgroupError(f"limit {limit_bytes}: must be ≥ 0")
    if version == 2:
        write_control_file(path / "memory.max", "max" if limit_bytes is None else str(limit_bytes))
        return
    memsw = path / "memory.memsw.limit_in_bytes"
    wanted = -1 if limit_bytes is None else limit_bytes
    if memsw.exists():
        try:
            memsw_limit = int(read_control_file(memsw))
        except ValueError:
            raise CgroupError(f"{memsw}: not a number", str(memsw)) from None
        if limit_bytes is None or limit_bytes > memsw_limit:
            write_control_file(memsw, str(wanted))
    write_control_file(path / "memory.limit_in_bytes", str(wanted))


# ---- freezing ---------------------------------------------------------------------------------
def v1_freezer(relative: str, root: Path = CGROUP_ROOT) -> Path:
    """The v1 freezer cgroup beside a memory cgroup (same path in the freezer hierarchy)."""
    return root / "freezer" / relative.strip("/")


def set_frozen(path: Path, version: int, frozen: bool) -> None:
    """`path`: the cgroup itself on v2, its freezer cgroup on v1."""
    if version == 2:
        write_control_file(path / "cgroup.freeze", "1" if frozen else "0")
    else:
        write_control_file(path / "freezer.state", "FROZEN" if frozen else "THAWED")


def is_frozen(path: Path, version: int) -> bool:
    """Whether every task is frozen (a freeze takes effect asynchronously)."""
    if version == 2:
        return parse_flat_keyed(read_control_file(path / "cgroup.events")).get("frozen") == 1
    return read_control_file(path / "freezer.state") == "FROZEN"


# ---- making and removing cgroups --------------------------------------------------------------
def create_parent(version: int, name: str, root: Path = CGROUP_ROOT) -> Path:
    parent = memory_hierarchy(version, root) / name
    try:
        parent.mkdir(exist_ok=True)
    except PermissionError:
        raise CgroupError(f"permission denied creating {parent}: the lab needs root", str(parent)) from None
    if version == 2:  # children get a memory controller only when the parent delegates it
        write_control_file(parent / "cgroup.subtree_control", "+memory")
    return parent


def create_guest(parent: Path, version: int, name: str, memory_bytes: int, swap_bytes: int) -> Path:
    path = parent / name
    if path.exists():  # left by a run that died: an empty cgroup goes, one still in use is an error
        try:
            path.rmdir()
        except OSError as exc:
            raise CgroupError(f"{path} is left from an earlier run and still in use ({exc.strerror}): "
                              "stop its processes or `balloonctl lab down` first", str(path)) from None
    path.mkdir()
    if version == 1:
        write_control_file(path / "memory.limit_in_bytes", str(memory_bytes))
        memsw = path / "memory.memsw.limit_in_bytes"
        if not memsw.exists():
            raise CgroupError("cgroup v1 without swap accounting: boot with swapaccount=1 (or use cgroup v2)")
        write_control_file(memsw, str(memory_bytes + swap_bytes))
        write_control_file(path / "memory.swappiness", "60")
    else:
        write_control_file(path / "memory.max", str(memory_bytes))
        if not (path / "memory.swap.max").exists():
            raise CgroupError("cgroup v2 without memory.swap.max: the kernel lacks swap accounting")
        write_control_file(path / "memory.swap.max", str(swap_bytes))
    return path


def pids_in(path: Path) -> list[int]:
    try:
        return [int(pid) for pid in (path / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def remove(path: Path, timeout_s: float = 10.0) -> None:
    """Kill what is left inside, then rmdir (the kernel refuses while a process or, briefly, a
    dying one is charged there). Children first."""
    if not path.exists():
        return
    for child in sorted((p for p in path.iterdir() if p.is_dir()), reverse=True):
        remove(child, timeout_s)
    deadline = time.monotonic() + timeout_s
    while True:
        for pid in pids_in(path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise CgroupError(f"cannot remove {path}: {exc.strerror}", str(path)) from None
            time.sleep(0.1)
