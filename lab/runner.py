"""`balloonctl lab up|down|status`: the compose topology without Docker. hostd runs as a
process on loopback, every guest in a memory cgroup of its own (limit = memsz, plus its own
swap) running balloon-guest (the agent beside a workload). What was made is written to a state
file as it is made, so `down` removes every cgroup and process even after a failed `up`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import psutil

from hostd.jsonout import dumps
from lab import cgroups
from lab.spec import Endpoints, LabSpec, guest_argv, guest_environment, hostd_argv

DEFAULT_STATE_DIR = Path("/run/balloonlab-lab")
DEFAULT_ENDPOINTS = Endpoints("tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556")
DEFAULT_CGROUP_NAME = "balloonlab-lab"
STATE_FILE = "state.json"
GUEST_STOP_TIMEOUT_S = 30.0  # agents deflate and say bye before they exit
PROJECT_ROOT = Path(__file__).resolve().parents[1]

Progress = Callable[[str], None]
# Processes this Python process started (when up and down run in one process, as in the
# experiments): kept so that they are reaped, not left as zombies or dropped while running.
_children: dict[int, subprocess.Popen[bytes]] = {}


class LabError(RuntimeError):
    """Printed by balloonctl as `balloonctl: ...`; the lab is left as the message says."""


@dataclass(frozen=True, slots=True)
class LabOptions:
    state_dir: Path = DEFAULT_STATE_DIR
    cgroup_name: str = DEFAULT_CGROUP_NAME
    endpoints: Endpoints = DEFAULT_ENDPOINTS
    wait_s: float = 60.0


# ---- process bookkeeping --------------------------------------------------------------------
def _stat(pid: int) -> tuple[str, int] | None:
    """The process's state letter and start time (clock ticks since boot): with the pid the
    start time names one process, so a recycled pid is never mistaken for ours."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[19])


def _record(process: subprocess.Popen[bytes]) -> dict[str, int | None]:
    stat = _stat(process.pid)
    return {"pid": process.pid, "start_ticks": stat[1] if stat else None}


def _alive(entry: dict[str, Any]) -> bool:
    stat = _stat(entry["pid"])
    return stat is not None and stat[1] == entry.get("start_ticks") and stat[0] != "Z"  # a zombie is not alive


def _signal_group(entry: dict[str, Any], signum: int) -> None:
    """Processes are started in sessions of their own: the group holds the children too."""
    if _alive(entry):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(entry["pid"], signum)


def _wait_gone(entries: list[dict[str, Any]], timeout_s: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        for entry in entries:  # reap our own children
            child = _children.get(entry["pid"])
            if child is not None and child.poll() is not None:
                del _children[entry["pid"]]
        left = [entry for entry in entries if _alive(entry)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


# ---- state file -----------------------------------------------------------------------------
def _state_path(options: LabOptions) -> Path:
    return options.state_dir / STATE_FILE


def read_state(options: LabOptions) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads(_state_path(options).read_text())
        return state
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LabError(f"unreadable lab state {_state_path(options)}: {exc}") from None


def _write_state(options: LabOptions, state: dict[str, Any]) -> None:
    path = _state_path(options)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(dumps(state, indent=2))
    temporary.replace(path)


def _running(state: dict[str, Any]) -> bool:
    entries = [state.get("hostd"), *state.get("guests", {}).values()]
    return any(entry and "pid" in entry and _alive(entry) for entry in entries)


# ---- up -------------------------------------------------------------------------------------
def _spawn(argv: list[str], log_path: Path, environment: dict[str, str],
           cgroup_procs: Path | None = None) -> subprocess.Popen[bytes]:
    def join_cgroup() -> None:  # runs in the child before exec: every page it maps is charged there
        if cgroup_procs is not None:
            cgroup_procs.write_text(str(os.getpid()))

    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                   env=environment, start_new_session=True,
                                   preexec_fn=join_cgroup if cgroup_procs else None)
    _children[process.pid] = process
    return process


def _log_tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def _hostd_status(endpoint: str, timeout_ms: int = 1000) -> dict[str, Any] | None:
    from hostd.client import CtlError, HostdClient

    try:
        return cast(dict[str, Any], HostdClient(endpoint, timeout_ms).status())
    except CtlError:
        return None


def up(spec: LabSpec, hostd_config: Path, options: LabOptions, progress: Progress = print) -> dict[str, Any]:
    """Start the lab and wait until hostd reports every guest. Returns the state."""
    if os.geteuid() != 0:
        raise LabError("the lab needs root: it makes memory cgroups and its agents mlock their balloons")
    if psutil.swap_memory().total == 0:
        raise LabError("the host has no swap enabled: ballooned guests page out to swap "
                       "(scripts/setup-swap.sh makes a swap file)")
    if not hostd_config.is_file():
        raise LabError(f"hostd configuration {hostd_config} not found")
    options.state_dir.mkdir(parents=True, exist_ok=True)
    previous = read_state(options)
    if previous is not None:
        if _running(previous):
            raise LabError(f"a lab is already up (state {_state_path(options)}): balloonctl lab down first")
        down(options, progress)  # leftovers of a lab that died: clean them before starting again
    version = cgroups.memory_cgroup_version()
    parent = cgroups.create_parent(version, options.cgroup_name)
    state: dict[str, Any] = {"cgroup_version": version, "cgroup_parent": str(parent),
                             "agent_endpoint": options.endpoints.agent,
                             "control_endpoint": options.endpoints.control, "guests": {}}
    _write_state(options, state)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    started = time.monotonic()

    hostd_log = options.state_dir / "hostd.log"
    hostd = _spawn(hostd_argv(sys.executable, hostd_config, options.endpoints, options.state_dir / "events.jsonl"),
                   hostd_log, environment)
    state["hostd"] = {**_record(hostd), "log": str(hostd_log)}
    _write_state(options, state)
    while _hostd_status(options.endpoints.control, 500) is None:
        if hostd.poll() is not None:
            down(options, lambda _line: None)
            raise LabError(f"hostd exited with code {hostd.returncode}:\n{_log_tail(hostd_log)}")
        if time.monotonic() - started > 20:
            down(options, lambda _line: None)
            raise LabError(f"hostd did not answer on {options.endpoints.control} within 20 s:\n{_log_tail(hostd_log)}")
    progress(f"hostd up on {options.endpoints.control} ({time.monotonic() - started:.1f} s)")

    for guest in spec.guests:
        try:
            path = cgroups.create_guest(parent, version, guest.name, guest.memory_bytes, guest.swap_bytes)
        except (cgroups.CgroupSetupError, OSError) as exc:
            down(options, lambda _line: None)
            raise LabError(f"guest {guest.name}: {exc}") from None
        log_path = options.state_dir / f"{guest.name}.log"
        report = options.state_dir / f"{guest.name}.workload.json"
        process = _spawn(guest_argv(sys.executable, guest),
                         log_path, guest_environment(environment, guest, options.endpoints, path, report),
                         path / "cgroup.procs")
        state["guests"][guest.name] = {**_record(process), "cgroup": str(path), "log": str(log_path),
                                       "workload_report": str(report), "memory_bytes": guest.memory_bytes,
                                       "swap_bytes": guest.swap_bytes}
        _write_state(options, state)
        progress(f"guest {guest.name}: {guest.memory_bytes >> 20} MiB + {guest.swap_bytes >> 20} MiB swap, "
                 f"{' '.join(guest.command) or guest.phases} (cgroup {path})")

    wanted = sorted(guest.name for guest in spec.guests)
    registered: list[str] = []
    while time.monotonic() - started < options.wait_s:
        snapshot = _hostd_status(options.endpoints.control)
        now_registered = sorted(vm["vm_id"] for vm in (snapshot or {}).get("vms", []) if vm["alive"])
        if now_registered != registered:
            registered = now_registered
            progress(f"registered with hostd: {len(registered)}/{len(wanted)} ({time.monotonic() - started:.1f} s)")
        if registered == wanted:
            state["registered_after_s"] = round(time.monotonic() - started, 2)
            _write_state(options, state)
            return state
        for name, entry in state["guests"].items():
            if not _alive(entry):
                raise LabError(f"guest {name} exited:\n{_log_tail(Path(entry['log']))}\n"
                               "(the rest is still up: balloonctl lab down)")
        time.sleep(0.5)
    missing = sorted(set(wanted) - set(registered))
    raise LabError(f"guests {missing} did not register within {options.wait_s:.0f} s (logs in {options.state_dir}; "
                   "the lab is still up: balloonctl lab down)")


# ---- down -----------------------------------------------------------------------------------
def down(options: LabOptions, progress: Progress = print) -> None:
    """Stop guests (their agents deflate and say bye), then hostd; remove every cgroup."""
    state = read_state(options)
    if state is None:
        state = {"guests": {}}
        with contextlib.suppress(cgroups.CgroupSetupError):
            parent = cgroups.memory_hierarchy(cgroups.memory_cgroup_version()) / options.cgroup_name
            if parent.exists():
                state["cgroup_parent"] = str(parent)
        if "cgroup_parent" not in state:
            progress("no lab is up")
            return
    guests = [entry for entry in state.get("guests", {}).values() if "pid" in entry]
    for entry in guests:
        _signal_group(entry, signal.SIGTERM)
    stuck = _wait_gone(guests, GUEST_STOP_TIMEOUT_S)
    for entry in stuck:
        _signal_group(entry, signal.SIGKILL)
    _wait_gone(stuck, 5)
    if "cgroup_parent" in state:
        cgroups.remove(Path(state["cgroup_parent"]))
    hostd = state.get("hostd")
    if hostd:
        _signal_group(hostd, signal.SIGTERM)
        if _wait_gone([hostd], 10):
            _signal_group(hostd, signal.SIGKILL)
            _wait_gone([hostd], 5)
    with contextlib.suppress(FileNotFoundError):
        _state_path(options).unlink()
    progress(f"lab down: {len(guests)} guests stopped ({len(stuck)} killed), cgroups removed, hostd stopped "
             f"(logs kept in {options.state_dir})")


# ---- status ---------------------------------------------------------------------------------
def status(options: LabOptions) -> dict[str, Any]:
    state = read_state(options)
    if state is None:
        raise LabError(f"no lab is up (no state in {options.state_dir}): balloonctl lab up")
    version = state.get("cgroup_version", 1)
    guests = {}
    for name, entry in state.get("guests", {}).items():
        guests[name] = {"alive": _alive(entry), "pid": entry["pid"], "cgroup": entry["cgroup"],
                        **cgroups.usage(Path(entry["cgroup"]), version)}
    return {"hostd_alive": bool(state.get("hostd")) and _alive(state["hostd"]),
            "control_endpoint": state["control_endpoint"], "guests": guests,
            "hostd": _hostd_status(state["control_endpoint"])}
