"""What `balloonctl attach TARGET` attaches to, and whether it can: TARGET (docker:NAME|ID,
cgroup:PATH, pid:PID) resolved to a memory cgroup (a container through the PID of its init, so
Docker's cgroupfs and systemd drivers, v1 and v2, are one case), its limits read, and the
refusals with a reason — no memory limit, no swap accounting or allowance, no permission to
join, no swap on the host. The parsers take the files' text (pure); the rest reads /proc and
the cgroup tree (or $BALLOONLAB_CGROUP_ROOT where the host's tree is mounted elsewhere)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cgroups import (
    CGROUP_ROOT,
    CgroupError,
    host_swap_total_bytes,
    memory_cgroup_path,
    memory_cgroup_version,
    memory_hierarchy,
    parse_proc_cgroup,
)
from cgroups.parse import parse_limit

CGROUP_ROOT_ENV = "BALLOONLAB_CGROUP_ROOT"  # the host's cgroup tree mounted elsewhere (a container)
_VM_ID_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


class AttachError(RuntimeError):
    """Attaching cannot work (or detaching found nothing); the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class AttachTarget:
    spec: str  # as given: docker:web, cgroup:/sys/fs/cgroup/memory/x, pid:123
    kind: str  # docker | cgroup | pid
    cgroup_path: Path  # the memory cgroup directory on this host
    cgroup_version: int
    default_vm_id: str
    follow_pid: int | None  # the process whose exit means the guest stopped (None: the cgroup's processes)
    container_id: str | None = None


# ---- resolving a target (pure parts take the file text) ---------------------------------------
def parse_target(text: str) -> tuple[str, str]:
    kind, sep, value = text.partition(":")
    if not sep or kind not in ("docker", "cgroup", "pid") or not value:
        raise AttachError(f"target {text!r}: expected docker:NAME|ID, cgroup:PATH or pid:PID")
    if kind == "pid" and not value.isdigit():
        raise AttachError(f"target {text!r}: pid:PID takes a process id")
    return kind, value


def memory_cgroup_of(proc_cgroup_text: str) -> tuple[int, str]:
    """(version, path below the hierarchy) of a /proc/PID/cgroup (cgroups.parse_proc_cgroup)."""
    try:
        return parse_proc_cgroup(proc_cgroup_text)
    except CgroupError:
        raise AttachError("the process is in no memory cgroup "
                          "(no memory controller line in /proc/PID/cgroup)") from None


def cgroup_root() -> Path:
    """The host's cgroup tree: /sys/fs/cgroup, or $BALLOONLAB_CGROUP_ROOT (run from a container
    that mounts the host's tree elsewhere, as the compose lab's `attach` service does)."""
    return Path(os.environ.get(CGROUP_ROOT_ENV) or CGROUP_ROOT)


def version_of(path: Path) -> int:
    if (path / "memory.limit_in_bytes").exists():
        return 1
    if (path / "memory.max").exists():
        return 2
    if (path / "memory.current").exists():
        raise AttachError(f"{path} is the root of the v2 hierarchy (it has no memory limit): name a child cgroup")
    raise AttachError(f"{path} is not a memory cgroup directory (no memory.limit_in_bytes or memory.max): on v2 "
                      "the parent must have +memory in cgroup.subtree_control")


def vm_id_from(name: str) -> str:
    cleaned = _VM_ID_CHARS.sub("-", name).strip("-.") or "guest"
    return cleaned[:63]


def proc_start_ticks(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def cgroup_of_pid(pid: int, root: Path) -> tuple[int, Path]:
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except FileNotFoundError:
        raise AttachError(f"no process {pid}") from None
    except OSError as exc:
        raise AttachError(f"cannot read /proc/{pid}/cgroup: {exc.strerror}") from None
    version, relative = memory_cgroup_of(text)
    return version, cgroup_directory(version, relative, root, f"process {pid}'s cgroup")


def cgroup_directory(version: int, relative: str, root: Path, what: str = "the cgroup") -> Path:
    """The directory of a /proc/PID/cgroup path below the hierarchy mounted at `root`."""
    if "/.." in f"{relative}/":
        # Seen from a private cgroup namespace (Docker's default on cgroup v2): the kernel would
        # also refuse to move a process into a cgroup outside this namespace's root.
        raise AttachError(f"{what} ({relative}) is outside this process's cgroup namespace: run attach in the "
                          "host's cgroup namespace (docker run --cgroupns host; compose: cgroup: host)")
    return memory_cgroup_path(version, relative, root)


def docker_inspect(name: str, run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run
                   ) -> dict[str, Any]:
    try:
        result = run(["docker", "inspect", "--type", "container", name], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise AttachError("docker:... needs the docker CLI on PATH") from None
    except subprocess.TimeoutExpired:
        raise AttachError("docker inspect did not answer within 30 s (is the Docker engine running?)") from None
    if result.returncode != 0:
        raise AttachError(f"docker inspect {name}: {result.stderr.strip() or 'failed'}")
    documents = json.loads(result.stdout)
    if not documents:
        raise AttachError(f"no container {name!r}")
    document: dict[str, Any] = documents[0]
    return document


def resolve(text: str, root: Path | None = None,
            inspect: Callable[[str], dict[str, Any]] = docker_inspect) -> AttachTarget:
    kind, value = parse_target(text)
    root = cgroup_root() if root is None else root
    if kind == "pid":
        pid = int(value)
        version, path = cgroup_of_pid(pid, root)
        comm = ""
        with contextlib.suppress(OSError):
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        return AttachTarget(text, kind, path, version, vm_id_from(f"{comm or 'pid'}-{pid}"), pid)
    if kind == "docker":
        document = inspect(value)
        state = document.get("State") or {}
        name = str(document.get("Name", value)).lstrip("/")
        if not state.get("Running") or not state.get("Pid"):
            raise AttachError(f"container {name} is not running ({state.get('Status', 'unknown')})")
        pid = int(state["Pid"])
        version, path = cgroup_of_pid(pid, root)
        return AttachTarget(text, kind, path, version, vm_id_from(name), pid, str(document.get("Id", "")))
    path = Path(value)
    if not path.is_absolute():
        try:
            version = memory_cgroup_version(root)
        except (CgroupError, OSError):  # no controller found: the unified hierarchy's layout
            version = 2
        path = memory_hierarchy(version, root) / value.strip("/")
    if not path.is_dir():
        raise AttachError(f"cgroup {value!r}: {path} does not exist")
    return AttachTarget(text, kind, path, version_of(path), vm_id_from(path.name), None)


# ---- what cannot work -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Limits:
    memory_bytes: int | None  # None: no limit
    swap_bytes: int | None  # the guest's own swap allowance; None: unlimited (v2 max) or unknown
    swap_accounting: bool


def read_limits(path: Path, version: int) -> Limits:
    def number(name: str) -> int | None:
        return parse_limit((path / name).read_text())

    try:
        if version == 1:
            memory = number("memory.limit_in_bytes")
            if not (path / "memory.memsw.limit_in_bytes").exists():
                return Limits(memory, None, False)
            memsw = number("memory.memsw.limit_in_bytes")
            swap = None if memsw is None or memory is None else max(0, memsw - memory)
            return Limits(memory, swap, True)
        memory = number("memory.max")
        if not (path / "memory.swap.max").exists():
            return Limits(memory, None, False)
        return Limits(memory, number("memory.swap.max"), True)
    except (OSError, ValueError) as exc:
        raise AttachError(f"cannot read the limits of {path}: {exc}") from None


def refusal(target: AttachTarget, limits: Limits, host_swap: int, can_join: bool) -> str | None:
    """Why attaching to `target` cannot work, or None."""
    where = f"{target.spec} ({target.cgroup_path})"
    if not can_join:
        return (f"{where}: no permission to join its cgroup ({target.cgroup_path / 'cgroup.procs'} is not writable): "
                "attach needs root")
    if limits.memory_bytes is None:
        hint = " (docker run --memory 512m --memory-swap 1g ...)" if target.kind == "docker" else ""
        return (f"{where}: the cgroup has no memory limit: a balloon squeezes a guest against its limit, and "
                f"without one it would only take memory from the whole host; give it a limit{hint}")
    if not limits.swap_accounting:
        return (f"{where}: the kernel does not account swap per cgroup (v1: boot with swapaccount=1; v2: "
                "CONFIG_MEMCG_SWAP): the guest's swap use could not be seen or bounded")
    if limits.swap_bytes == 0:
        hint = " (docker: --memory-swap larger than --memory)" if target.kind == "docker" else ""
        return (f"{where}: the guest may use no swap (its memory+swap limit equals its memory limit): what the "
                f"balloon displaces would have nowhere to go but the OOM killer; allow it some swap{hint}")
    if host_swap == 0:
        return "the host has no swap enabled: ballooned guests page out to swap (scripts/setup-swap.sh)"
    return None


def check(target: AttachTarget) -> Limits:
    limits = read_limits(target.cgroup_path, target.cgroup_version)
    reason = refusal(target, limits, host_swap_total_bytes(), os.access(target.cgroup_path / "cgroup.procs", os.W_OK))
    if reason:
        raise AttachError(reason)
    return limits
