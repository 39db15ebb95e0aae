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
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cgroups import CGROUP_ROOT
from guestagent.attach_target import (  # resolving and refusals; importable from here too
    CGROUP_ROOT_ENV,
    AttachError,
    AttachTarget,
    Limits,
    cgroup_directory,
    cgroup_of_pid,
    cgroup_root,
    check,
    docker_inspect,
    memory_cgroup_of,
    parse_target,
    proc_start_ticks,
    read_limits,
    refusal,
    resolve,
    version_of,
    vm_id_from,
)

log = logging.getLogger("balloon-attach")

DEFAULT_STATE_DIR = Path("/run/balloonlab/attach")
DEFAULT_HOST_ENDPOINT = "tcp://127.0.0.1:5555"
AGENT_STOP_TIMEOUT_S = 20.0  # the agent deflates before it leaves: well under a second for 1 GiB
FOLLOW_POLL_S = 0.1
PROJECT_ROOT = Path(__file__).resolve().parents[1]


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
    ticks = proc_start_ticks(pid)
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
    _, path = cgroup_of_pid(os.getpid(), cgroup_root() if root is None else root)
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
                 "supervisor_start_ticks": proc_start_ticks(os.getpid()), "agent_pid": agent.pid,
                 "agent_start_ticks": proc_start_ticks(agent.pid), "host_endpoint": options.host_endpoint,
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


__all__ = [  # the supervisor's names and the target's (guestagent.attach_target)
    "AGENT_STOP_TIMEOUT_S",
    "CGROUP_ROOT",
    "CGROUP_ROOT_ENV",
    "DEFAULT_HOST_ENDPOINT",
    "DEFAULT_STATE_DIR",
    "FOLLOW_POLL_S",
    "PROJECT_ROOT",
    "AttachError",
    "AttachOptions",
    "AttachTarget",
    "Limits",
    "add_arguments",
    "agent_environment",
    "attached",
    "cgroup_directory",
    "cgroup_of_pid",
    "cgroup_root",
    "check",
    "detach",
    "docker_inspect",
    "main",
    "memory_cgroup_of",
    "options_from",
    "parse_target",
    "proc_start_ticks",
    "read_limits",
    "read_state",
    "refusal",
    "resolve",
    "run_attached",
    "state_path",
    "version_of",
    "vm_id_from",
]
