"""`balloonctl lab up|down|status`: the compose topology without Docker. hostd runs as a
process on loopback, every guest in a memory cgroup of its own (limit = memsz, plus its own
swap) running balloon-guest (the agent beside a workload). What was made is written to a state
file as it is made, so `down` removes every cgroup and process even after a failed `up`.

Secure by default, like the compose lab (a guest's workload is untrusted):
- the state directory is 0700 root; CurveZMQ keys are made there at the first `up`
  (lab/compose_keys.py's `provision`, kept across `down`/`up`): each guest's agent key is
  allowlisted for that guest's vm id alone, and each agent pins hostd's key;
- control stays on loopback, and every change needs the control token (0600 root, at the
  path balloonctl reads by default), so `balloonctl status/set` stay one command for root;
- each guest's workload runs as a uid:gid of its own (workload_user, default AUTO_UID_BASE +
  the guest's index), with no supplementary groups, in its own 0700 directory: it cannot read
  the token, any key, or another guest's files, nor signal another guest. The agents (ours;
  they mlock) stay root and get their key files by path, never in an environment variable
  the workload inherits or on a command line."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import stat
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
from lab.spec import (
    Endpoints,
    GuestSpec,
    LabKeys,
    LabSpec,
    WorkloadUser,
    guest_argv,
    guest_environment,
    hostd_argv,
)

DEFAULT_STATE_DIR = Path("/run/balloonlab-lab")
DEFAULT_ENDPOINTS = Endpoints("tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556")
DEFAULT_CGROUP_NAME = "balloonlab-lab"
STATE_FILE = "state.json"
GUEST_STOP_TIMEOUT_S = 30.0  # agents deflate and say bye before they exit
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Guest i's workload runs as uid = gid = AUTO_UID_BASE + i unless lab.toml names a
# workload_user: in Debian's 60000-64999 block (allocated on demand, none here), below nobody.
AUTO_UID_BASE = 64200
KEYS_DIR = "keys"
WORKLOADS_DIR = "guests"

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


# ---- security -------------------------------------------------------------------------------
def _private_state_dir(path: Path) -> None:
    """The state directory holds the keys and logs: 0700, root's, not a symlink."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise LabError(f"state directory {path} must be a directory owned by uid {os.geteuid()} (not a symlink)")
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)


def provision_keys(spec: LabSpec, keys: LabKeys) -> list[str]:
    """The compose lab's key service, for the cgroup lab: keys kept, missing ones made, every
    guest's key bound to its own vm id; a guest no longer in the lab file loses its entry."""
    from lab.compose_keys import provision
    from protocol.keys import KeyFileError, allowlist_entries, allowlist_remove

    keys.root.mkdir(mode=0o700, exist_ok=True)
    os.chmod(keys.root, 0o700)
    try:
        done = provision(keys.hostd_dir, {guest.name: keys.guest_dir(guest.name) for guest in spec.guests})
        for name in set(allowlist_entries(keys.allowlist)) - {guest.name for guest in spec.guests}:
            allowlist_remove(keys.allowlist, name)
            done.append(f"{name}: not in the lab file, key no longer allowed")
    except KeyFileError as exc:
        raise LabError(f"lab keys in {keys.root}: {exc}") from None
    return done


def workload_users(spec: LabSpec) -> dict[str, tuple[int, int]]:
    """Each guest's workload uid:gid: workload_user, else AUTO_UID_BASE + its index (a uid no
    local account has, so that nothing else on the host is reachable with it)."""
    from guestagent.runas import RunAsError, parse_user

    users = {}
    for index, guest in enumerate(spec.guests):
        if guest.workload_user:
            try:
                users[guest.name] = parse_user(guest.workload_user)
            except RunAsError as exc:
                raise LabError(f"guest {guest.name}: workload_user: {exc}") from None
            continue
        uid = AUTO_UID_BASE + index
        try:
            account = pwd.getpwuid(uid).pw_name
        except KeyError:
            users[guest.name] = (uid, uid)
            continue
        raise LabError(f"guest {guest.name}: uid {uid} (the lab's default for guest {index}) belongs to the "
                       f"local user {account}: set workload_user in the lab file")
    return users


def _workload_dir(state_dir: Path, guest: GuestSpec, user: tuple[int, int]) -> WorkloadUser:
    """The workload's own directory, made afresh (0700, owned by its uid): its cwd and report."""
    parent = state_dir / WORKLOADS_DIR
    parent.mkdir(mode=0o700, exist_ok=True)
    path = parent / guest.name
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():  # the last run's: its workload owned it (rmtree does not follow symlinks inside)
        shutil.rmtree(path)
    path.mkdir(mode=0o700)
    os.chown(path, user[0], user[1])
    return WorkloadUser(user[0], user[1], path)


def control_token_file() -> Path:
    """Where this lab's hostd keeps the token (and balloonctl finds it): hostd's default path,
    or BALLOONLAB_CONTROL_TOKEN_FILE, which both read."""
    from hostd.client import DEFAULT_TOKEN_FILE

    return Path(os.environ.get("BALLOONLAB_CONTROL_TOKEN_FILE") or DEFAULT_TOKEN_FILE)


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
    _private_state_dir(options.state_dir)
    previous = read_state(options)
    if previous is not None:
        if _running(previous):
            raise LabError(f"a lab is already up (state {_state_path(options)}): balloonctl lab down first")
        down(options, progress)  # leftovers of a lab that died: clean them before starting again
    users = workload_users(spec)
    started = time.monotonic()
    keys = LabKeys(options.state_dir / KEYS_DIR)
    for line in provision_keys(spec, keys):
        progress(f"keys: {line}")
    version = cgroups.memory_cgroup_version()
    parent = cgroups.create_parent(version, options.cgroup_name)
    state: dict[str, Any] = {"cgroup_version": version, "cgroup_parent": str(parent),
                             "agent_endpoint": options.endpoints.agent,
                             "control_endpoint": options.endpoints.control, "guests": {},
                             "security": {"curve": True, "keys": str(keys.root),
                                          "agent_allowlist": str(keys.allowlist),
                                          "control_token_file": str(control_token_file())}}
    _write_state(options, state)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}

    hostd_log = options.state_dir / "hostd.log"
    hostd = _spawn(hostd_argv(sys.executable, hostd_config, options.endpoints, options.state_dir / "events.jsonl",
                              keys), hostd_log, environment)
    state["hostd"] = {**_record(hostd), "log": str(hostd_log)}
    _write_state(options, state)
    while _hostd_status(options.endpoints.control, 500) is None:
        if hostd.poll() is not None:
            down(options, lambda _line: None)
            raise LabError(f"hostd exited with code {hostd.returncode}:\n{_log_tail(hostd_log)}")
        if time.monotonic() - started > 20:
            down(options, lambda _line: None)
            raise LabError(f"hostd did not answer on {options.endpoints.control} within 20 s:\n{_log_tail(hostd_log)}")
    progress(f"hostd up on {options.endpoints.control} ({time.monotonic() - started:.1f} s): agents over CurveZMQ "
             f"(allowlist {keys.allowlist}), changes need the control token {control_token_file()}")

    for guest in spec.guests:
        try:
            path = cgroups.create_guest(parent, version, guest.name, guest.memory_bytes, guest.swap_bytes)
        except (cgroups.CgroupSetupError, OSError) as exc:
            down(options, lambda _line: None)
            raise LabError(f"guest {guest.name}: {exc}") from None
        log_path = options.state_dir / f"{guest.name}.log"
        user = _workload_dir(options.state_dir, guest, users[guest.name])
        report = user.workdir / "workload.json"
        process = _spawn(guest_argv(sys.executable, guest), log_path,
                         guest_environment(environment, guest, options.endpoints, path, report, keys, user),
                         path / "cgroup.procs")
        state["guests"][guest.name] = {**_record(process), "cgroup": str(path), "log": str(log_path),
                                       "workload_report": str(report), "memory_bytes": guest.memory_bytes,
                                       "swap_bytes": guest.swap_bytes,
                                       "workload_user": f"{user.uid}:{user.gid}", "workload_dir": str(user.workdir),
                                       "agent_key": str(keys.guest_secret(guest.name))}
        _write_state(options, state)
        warning = " (root: it can read the lab's keys and token)" if user.uid == 0 else ""
        progress(f"guest {guest.name}: {guest.memory_bytes >> 20} MiB + {guest.swap_bytes >> 20} MiB swap, "
                 f"{' '.join(guest.command) or guest.phases} as uid:gid {user.uid}:{user.gid}{warning} "
                 f"(cgroup {path})")

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
                        "workload_user": entry.get("workload_user"), **cgroups.usage(Path(entry["cgroup"]), version)}
    return {"hostd_alive": bool(state.get("hostd")) and _alive(state["hostd"]),
            "control_endpoint": state["control_endpoint"], "guests": guests,
            "security": state.get("security"), "hostd": _hostd_status(state["control_endpoint"])}
