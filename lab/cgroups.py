"""Memory cgroups the lab makes for its guests, v1 or v2: a parent `balloonlab-lab` (or the
name given) with one child per guest, limits for memory and memory + swap, and removal that
first kills whatever still runs inside."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


class CgroupSetupError(RuntimeError):
    """The host cannot give the lab what it needs (no memory controller, no swap accounting,
    no permission); the message says what to do."""


def memory_cgroup_version(root: Path = CGROUP_ROOT) -> int:
    if (root / "memory" / "memory.limit_in_bytes").exists():
        return 1
    controllers = root / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        return 2
    raise CgroupSetupError(f"no memory cgroup controller under {root} (v1 {root}/memory or v2 with 'memory')")


def memory_hierarchy(version: int, root: Path = CGROUP_ROOT) -> Path:
    return root / "memory" if version == 1 else root


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except PermissionError:
        raise CgroupSetupError(f"permission denied writing {path}: the lab needs root") from None
    except OSError as exc:
        raise CgroupSetupError(f"cannot write {value!r} to {path}: {exc.strerror}") from None


def create_parent(version: int, name: str, root: Path = CGROUP_ROOT) -> Path:
    parent = memory_hierarchy(version, root) / name
    try:
        parent.mkdir(exist_ok=True)
    except PermissionError:
        raise CgroupSetupError(f"permission denied creating {parent}: the lab needs root") from None
    if version == 2:  # children get a memory controller only when the parent delegates it
        _write(parent / "cgroup.subtree_control", "+memory")
    return parent


def create_guest(parent: Path, version: int, name: str, memory_bytes: int, swap_bytes: int) -> Path:
    path = parent / name
    path.mkdir()
    if version == 1:
        _write(path / "memory.limit_in_bytes", str(memory_bytes))
        memsw = path / "memory.memsw.limit_in_bytes"
        if not memsw.exists():
            raise CgroupSetupError("cgroup v1 without swap accounting: boot with swapaccount=1 (or use cgroup v2)")
        _write(memsw, str(memory_bytes + swap_bytes))
        _write(path / "memory.swappiness", "60")
    else:
        _write(path / "memory.max", str(memory_bytes))
        if not (path / "memory.swap.max").exists():
            raise CgroupSetupError("cgroup v2 without memory.swap.max: the kernel lacks swap accounting")
        _write(path / "memory.swap.max", str(swap_bytes))
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
