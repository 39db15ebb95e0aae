"""Memory cgroups the lab makes for its guests, v1 or v2: a parent `balloonlab-lab` (or the
name given) with one child per guest, limits for memory and memory + swap, and removal that
first kills whatever still runs inside."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from hostd.cgroupfs import (
    CGROUP_ROOT,
    BackendError,
    memory_cgroup_version,
    memory_hierarchy,
    write_control_file,
)

# One error type for cgroup file trouble: the primitives are hostd's cgroupfs backend's.
CgroupSetupError = BackendError
__all__ = ["CgroupSetupError", "create_guest", "create_parent", "memory_cgroup_version", "memory_hierarchy",
           "pids_in", "remove", "usage"]


def create_parent(version: int, name: str, root: Path = CGROUP_ROOT) -> Path:
    parent = memory_hierarchy(version, root) / name
    try:
        parent.mkdir(exist_ok=True)
    except PermissionError:
        raise CgroupSetupError(f"permission denied creating {parent}: the lab needs root") from None
    if version == 2:  # children get a memory controller only when the parent delegates it
        write_control_file(parent / "cgroup.subtree_control", "+memory")
    return parent


def create_guest(parent: Path, version: int, name: str, memory_bytes: int, swap_bytes: int) -> Path:
    path = parent / name
    if path.exists():  # left by a run that died: an empty cgroup goes, one still in use is an error
        try:
            path.rmdir()
        except OSError as exc:
            raise CgroupSetupError(f"{path} is left from an earlier run and still in use ({exc.strerror}): "
                                   "stop its processes or `balloonctl lab down` first") from None
    path.mkdir()
    if version == 1:
        write_control_file(path / "memory.limit_in_bytes", str(memory_bytes))
        memsw = path / "memory.memsw.limit_in_bytes"
        if not memsw.exists():
            raise CgroupSetupError("cgroup v1 without swap accounting: boot with swapaccount=1 (or use cgroup v2)")
        write_control_file(memsw, str(memory_bytes + swap_bytes))
        write_control_file(path / "memory.swappiness", "60")
    else:
        write_control_file(path / "memory.max", str(memory_bytes))
        if not (path / "memory.swap.max").exists():
            raise CgroupSetupError("cgroup v2 without memory.swap.max: the kernel lacks swap accounting")
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
                raise CgroupSetupError(f"cannot remove {path}: {exc.strerror}") from None
            time.sleep(0.1)


def usage(path: Path, version: int) -> dict[str, int | None]:
    """Memory and swap in use, bytes (None when the cgroup is gone)."""
    try:
        if version == 1:
            memory = int((path / "memory.usage_in_bytes").read_text())
            memsw = int((path / "memory.memsw.usage_in_bytes").read_text())
            return {"memory_bytes": memory, "swap_bytes": max(0, memsw - memory)}
        return {"memory_bytes": int((path / "memory.current").read_text()),
                "swap_bytes": int((path / "memory.swap.current").read_text())}
    except (OSError, ValueError):
        return {"memory_bytes": None, "swap_bytes": None}
