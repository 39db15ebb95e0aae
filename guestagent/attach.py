"""The attach supervisor: a balloon for a guest that has no agent in it.

    balloonctl attach docker:NAME|ID | cgroup:PATH | pid:PID  [--vm-id VM] [--host-endpoint EP]
    balloonctl detach VM
    python -m guestagent.attach TARGET ...      (the same, without balloonctl's other options)

TARGET names a memory cgroup: a container's (found through the PID of its init process, so
Docker's cgroupfs and systemd drivers, v1 and v2, are one case), a cgroup directory (absolute,
or relative to the memory hierarchy), or the cgroup of a process. The supervisor starts an
agent (`python -m guestagent`) that joins that cgroup before it runs any code: every page it
maps and pins is charged to the guest, exactly as an agent inside the guest would be. The
supervisor itself stays outside.

It follows the guest: when the container's init / the process exits (pidfd), or every other
process leaves the cgroup, the agent is first moved back out of the guest's cgroup (so the
runtime can remove the cgroup at once; on v1 its pinned pages stay charged there until they
are freed a moment later), then stopped (it deflates and says bye). SIGTERM/SIGINT (Ctrl-C,
`balloonctl detach VM`) stop the agent while it is still inside: it deflates and says bye,
and the guest's memory is its own again.

The host's cgroup tree is /sys/fs/cgroup, or $BALLOONLAB_CGROUP_ROOT where it is mounted
elsewhere (the compose lab's `attach` service: the host's tree at /host/sys/fs/cgroup, redis's
pid namespace, `cgroup: host`, and `pid:1` for redis's init).

Refused with a reason: no memory limit (a balloon squeezes a guest against its limit), no
swap accounting or no swap allowance (the guest's kernel would have nowhere to put what the
balloon displaces but the OOM killer), no permission to join the cgroup, no swap on the host.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cgroups import (
    CGROUP_ROOT,
    CgroupError,
    memory_cgroup_path,
    memory_cgroup_version,
    memory_hierarchy,
    parse_proc_cgroup,
)
from cgroups.parse import parse_limit

log = logging.getLogger("balloon-attach")

CGROUP_ROOT_ENV = "BALLOONLAB_CGROUP_ROOT"  # the host's cgroup tree mounted elsewhere (a container)
DEFAULT_STATE_DIR = Path("/run/balloonlab/attach")
DEFAULT_HOST_ENDPOINT = "tcp://127.0.0.1:5555"
AGENT_STOP_TIMEOUT_S = 20.0  # the agent deflates before it leaves: well under a second for 1 GiB
FOLLOW_POLL_S = 0.1
PROJECT_ROOT = Path(__file__).resolve().parents[1]
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


def _proc_start_ticks(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _cgroup_of_pid(pid: int, root: Path) -> tuple[int, Path]:
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
        version, path = _cgroup_of_pid(pid, root)
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
        version, path = _cgroup_of_pid(pid, root)
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


def host_swap_bytes() -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("SwapTotal:"):
                return int(line.split()[1]) * 1024
    return 0


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
    reason = refusal(target, limits, host_swap_bytes(), os.access(target.cgroup_path / "cgroup.procs", os.W_OK))
    if reason:
        raise AttachError(reason)
    return limits


# ---- the state file: what `detach` signals ---------------------------------------------------
def state_path(state_dir: Path, vm_id: str) -> Path:
    return state_dir / f"{vm_id}.json"


def read_state(state_dir: Path, vm_id: str) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads(state_path(state_dir, vm_id).read_text())
        return state
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise AttachError(f"unreadable attach state {state_path(state_dir, vm_id)}: {exc}") from None


def _alive(pid: int, start_ticks: int | None) -> bool:
    ticks = _proc_start_ticks(pid)
    if ticks is None or ticks != start_ticks:
        return False
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def _write_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(state, indent=2))
    temporary.replace(path)


def detach(vm_id: str, state_dir: Path = DEFAULT_STATE_DIR, timeout_s: float = 30.0) -> str:
    """Stop the supervisor attached as `vm_id` (its agent deflates and says bye) and wait."""
    state = read_state(state_dir, vm_id)
    if state is None:
        raise AttachError(f"no attached vm {vm_id!r} (no {state_path(state_dir, vm_id)}); attached: "
                          f"{', '.join(attached(state_dir)) or 'none'}")
    pid, ticks = int(state["supervisor_pid"]), state.get("supervisor_start_ticks")
    if not _alive(pid, ticks):
        with contextlib.suppress(FileNotFoundError):
            state_path(state_dir, vm_id).unlink()
        agent = state.get("agent_pid")
        if agent and _alive(int(agent), state.get("agent_start_ticks")):  # supervisor killed -9: its agent
            os.kill(int(agent), signal.SIGTERM)
        return f"{vm_id}: its supervisor had already exited (stale state removed)"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(pid, ticks):
        if time.monotonic() > deadline:
            raise AttachError(f"{vm_id}: the supervisor (pid {pid}) did not stop within {timeout_s:.0f} s")
        time.sleep(0.05)
    return f"detached {vm_id}: the agent deflated and left {state['cgroup']}"


def attached(state_dir: Path = DEFAULT_STATE_DIR) -> list[str]:
    return sorted(path.stem for path in state_dir.glob("*.json")) if state_dir.is_dir() else []


# ---- the supervisor --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AttachOptions:
    vm_id: str | None = None
    host_endpoint: str = DEFAULT_HOST_ENDPOINT
    state_dir: Path = DEFAULT_STATE_DIR
    agent_log: Path | None = None  # default: the supervisor's stderr
    agent_env: Mapping[str, str] | None = None  # extra BALLOONLAB_* settings for the agent


class _Follower:
    """Tells when the guest has stopped: its init / process exited (a pidfd, no polling race),
    or no process but the agent is left in the cgroup."""

    def __init__(self, target: AttachTarget) -> None:
        self.target = target
        self.pidfd: int | None = None
        if target.follow_pid is not None:
            try:
                self.pidfd = os.pidfd_open(target.follow_pid)
            except ProcessLookupError:
                raise AttachError(f"{target.spec}: process {target.follow_pid} is gone") from None
        self._empty_checks = 0

    def stopped(self, agent_pid: int, wait_s: float) -> str | None:
        if self.pidfd is not None:
            readable, _, _ = select.select([self.pidfd], [], [], wait_s)
            if readable:
                return f"process {self.target.follow_pid} exited"
            return None
        time.sleep(wait_s)
        try:
            others = [pid for pid in (self.target.cgroup_path / "cgroup.procs").read_text().split()
                      if int(pid) != agent_pid]
        except FileNotFoundError:
            return "the cgroup was removed"
        except OSError:
            return None
        self._empty_checks = 0 if others else self._empty_checks + 1
        return "no process left in the cgroup but the agent" if self._empty_checks >= 2 else None

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)


def _own_memory_cgroup_procs(version: int, root: Path | None = None) -> Path:
    _, path = _cgroup_of_pid(os.getpid(), cgroup_root() if root is None else root)
    return path / "cgroup.procs"


def agent_environment(base: Mapping[str, str], target: AttachTarget, vm_id: str, options: AttachOptions
                      ) -> dict[str, str]:
    environment = {k: v for k, v in base.items() if not k.startswith("BALLOONLAB_")}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), base.get("PYTHONPATH")]))
    for name in ("BALLOONLAB_LOG_LEVEL", "BALLOONLAB_REPORT_INTERVAL", "BALLOONLAB_CURVE_SERVER_PUBLIC_KEY",
                 "BALLOONLAB_CURVE_CLIENT_KEY"):
        if name in base:
            environment[name] = base[name]
    environment.update(options.agent_env or {})
    environment.update({"BALLOONLAB_HOST_ENDPOINT": options.host_endpoint, "BALLOONLAB_VM_ID": vm_id,
                        "BALLOONLAB_CGROUP_PATH": str(target.cgroup_path)})
    return environment


def run_attached(target: AttachTarget, options: AttachOptions,
                 on_started: Callable[[str], None] | None = None) -> int:
    """Check, start the agent in the target's cgroup, follow the target; returns the exit code
    (0: detached or the target stopped; the agent's code if it failed on its own)."""
    limits = check(target)
    vm_id = options.vm_id or target.default_vm_id
    from protocol.errors import ProtocolError
    from protocol.messages import check_vm_id

    try:
        check_vm_id(vm_id)
    except ProtocolError as exc:
        raise AttachError(f"vm id: {exc.detail} (give --vm-id)") from None
    path = state_path(options.state_dir, vm_id)
    previous = read_state(options.state_dir, vm_id)
    if previous is not None and _alive(int(previous["supervisor_pid"]), previous.get("supervisor_start_ticks")):
        raise AttachError(f"vm {vm_id} is already attached (supervisor pid {previous['supervisor_pid']}): "
                          f"balloonctl detach {vm_id}, or give another --vm-id")
    follower = _Follower(target)
    stop = {"signal": 0}

    def request_stop(signum: int, _frame: object) -> None:
        stop["signal"] = signum

    old_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    procs = target.cgroup_path / "cgroup.procs"
    home = _own_memory_cgroup_procs(target.cgroup_version)

    def join_guest() -> None:  # in the child, before exec: every page the agent maps is the guest's
        procs.write_text(str(os.getpid()))

    log_file = open(options.agent_log, "ab") if options.agent_log else None  # noqa: SIM115
    try:
        try:
            agent = subprocess.Popen([sys.executable, "-m", "guestagent"], stdin=subprocess.DEVNULL,
                                     stdout=log_file, stderr=log_file,
                                     env=agent_environment(os.environ, target, vm_id, options),
                                     preexec_fn=join_guest)
        except (OSError, subprocess.SubprocessError) as exc:
            raise AttachError(f"cannot start the agent in {target.cgroup_path}: {exc}") from None
        state = {"vm_id": vm_id, "target": target.spec, "cgroup": str(target.cgroup_path),
                 "cgroup_version": target.cgroup_version, "supervisor_pid": os.getpid(),
                 "supervisor_start_ticks": _proc_start_ticks(os.getpid()), "agent_pid": agent.pid,
                 "agent_start_ticks": _proc_start_ticks(agent.pid), "host_endpoint": options.host_endpoint,
                 "memory_limit_bytes": limits.memory_bytes, "swap_limit_bytes": limits.swap_bytes,
                 "target_info": asdict(target) | {"cgroup_path": str(target.cgroup_path)}}
        _write_state(path, state)
        message = (f"attached {vm_id}: agent pid {agent.pid} in {target.cgroup_path} (cgroup v{target.cgroup_version}, "
                   f"memory {(limits.memory_bytes or 0) >> 20} MiB, swap "
                   f"{'unlimited' if limits.swap_bytes is None else f'{limits.swap_bytes >> 20} MiB'}), host "
                   f"{options.host_endpoint}; detach with `balloonctl detach {vm_id}` or Ctrl-C")
        log.info("%s", message)
        if on_started:
            on_started(message)
        exit_code = 0
        while not stop["signal"]:
            if agent.poll() is not None:
                log.error("agent exited on its own with code %d", agent.returncode)
                exit_code = agent.returncode or 1
                break
            reason = follower.stopped(agent.pid, FOLLOW_POLL_S)
            if reason:
                log.info("%s stopped (%s): moving the agent out of its cgroup, then stopping it", target.spec, reason)
                # Out first: the runtime can then remove the guest's cgroup at once.
                with contextlib.suppress(OSError):
                    home.write_text(str(agent.pid))
                break
        if stop["signal"]:
            log.info("%s: the agent deflates and leaves %s", signal.Signals(stop["signal"]).name, target.cgroup_path)
        _stop_agent(agent)
        return exit_code
    finally:
        follower.close()
        for signum, handler in old_handlers.items():
            signal.signal(signum, handler)
        if log_file:
            log_file.close()
        current = read_state(options.state_dir, vm_id)
        if current is not None and current.get("supervisor_pid") == os.getpid():
            path.unlink(missing_ok=True)


def _stop_agent(agent: subprocess.Popen[bytes]) -> None:
    if agent.poll() is not None:
        return
    agent.send_signal(signal.SIGTERM)
    try:
        agent.wait(AGENT_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log.warning("the agent did not stop within %.0f s: killing it (the kernel frees its pages)",
                    AGENT_STOP_TIMEOUT_S)
        agent.kill()
        agent.wait()


# ---- command line -----------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="docker:NAME|ID, cgroup:PATH (absolute or below the memory hierarchy) "
                        "or pid:PID")
    parser.add_argument("--vm-id", help="the vm id to register (default: the container's name, the cgroup's "
                        "directory name, or COMM-PID)")
    parser.add_argument("--host-endpoint", default=os.environ.get("BALLOONLAB_HOST_ENDPOINT", DEFAULT_HOST_ENDPOINT),
                        help=f"hostd's agent endpoint (default $BALLOONLAB_HOST_ENDPOINT or {DEFAULT_HOST_ENDPOINT})")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help=f"where attached vms are recorded for detach (default {DEFAULT_STATE_DIR})")
    parser.add_argument("--agent-log", type=Path, help="the agent's log file (default: this process's stderr)")
    parser.add_argument("--report-interval", help="the agent's status period, e.g. 500ms (default 1s)")


def options_from(args: argparse.Namespace) -> AttachOptions:
    extra = {"BALLOONLAB_REPORT_INTERVAL": args.report_interval} if args.report_interval else {}
    return AttachOptions(args.vm_id, args.host_endpoint, args.state_dir, args.agent_log, extra)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="balloon-attach", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_attached(resolve(args.target), options_from(args))
    except AttachError as exc:
        print(f"balloon-attach: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
