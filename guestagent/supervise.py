"""balloon-guest: a guest container's entry point — the balloon agent and a workload side by side.

    balloon-guest [--phases SPEC] [-- COMMAND ...]

Starts `balloon-agent` (configured by its BALLOONLAB_* environment) and a workload: by default
`balloon-workload --phases SPEC` (SPEC from --phases or BALLOONLAB_WORKLOAD_PHASES) reporting to
the agent through a file; or any COMMAND after `--` (stress-ng, a database...). Both share the
container's memory cgroup, which is what the balloon squeezes.

The workload is not trusted: it never gets the agent's key paths (BALLOONLAB_CURVE_*). With
BALLOONLAB_WORKLOAD_USER=UID:GID (and BALLOONLAB_WORKLOAD_DIR, its own directory; `balloonctl
lab up` sets both) it runs as that user with no supplementary groups and a minimal
environment: balloon-workload through guestagent.runas (which drops privileges after its
imports), any other COMMAND with subprocess's user=/group=.

SIGTERM/SIGINT: the agent is stopped first (it deflates and says bye), then the workload;
exit 0. If either child exits on its own, the other is stopped too and the child's exit code
is returned, so the container's restart policy sees the failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("balloon-guest")
# What an unprivileged workload inherits (besides HOME and its own BALLOONLAB_WORKLOAD_* settings).
WORKLOAD_ENVIRONMENT = ("PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ", "TERM", "PYTHONPATH",
                        "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE")
WORKLOAD_OWN_SETTINGS = ("BALLOONLAB_WORKLOAD_REPORT", "BALLOONLAB_WORKLOAD_PHASES")
CREDENTIAL_SETTINGS = ("BALLOONLAB_CURVE_", "BALLOONLAB_CONTROL_")
STOP_TIMEOUT_S = 20.0  # the agent deflates before it leaves: a 1 GiB balloon takes well under a second


def _stop(process: subprocess.Popen[bytes], name: str) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop within %.0f s: killing it", name, STOP_TIMEOUT_S)
        process.kill()
        process.wait()


def workload_environment(environ: dict[str, str], workdir: Path | None) -> dict[str, str]:
    """Where the agent's key files are is not the workload's business; run unprivileged (a
    workload user), it gets a minimal environment: none of the agent's settings at all."""
    if workdir is None:
        return {k: v for k, v in environ.items() if not k.startswith(CREDENTIAL_SETTINGS)}
    kept = {k: v for k, v in environ.items() if k in WORKLOAD_ENVIRONMENT or k in WORKLOAD_OWN_SETTINGS}
    return {**kept, "HOME": str(workdir)}


def workload_command(command: list[str], user: tuple[int, int] | None, workdir: Path | None,
                     ) -> tuple[list[str], dict[str, Any]]:
    """The command line and Popen arguments that start the workload (as `user` when given)."""
    if user is None or workdir is None:
        return command, {}
    from guestagent.runas import PYTHON_WORKLOADS, drop_popen_arguments

    if len(command) >= 3 and command[1] == "-m" and command[2] in PYTHON_WORKLOADS:
        # Ours: started as root (the interpreter may live where the user cannot go), it drops
        # privileges after its imports and before it touches memory.
        return [sys.executable, "-m", "guestagent.runas", "--user", f"{user[0]}:{user[1]}", "--dir", str(workdir),
                *command[2:]], {"cwd": str(workdir)}
    return command, drop_popen_arguments(user[0], user[1], workdir)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(prog="balloon-guest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", default=os.environ.get("BALLOONLAB_WORKLOAD_PHASES", "active 256MiB"),
                        help="balloon-workload phase spec (env BALLOONLAB_WORKLOAD_PHASES; default 'active 256MiB')")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    environment = dict(os.environ)
    user = None
    workdir = None
    if environment.get("BALLOONLAB_WORKLOAD_USER"):
        from guestagent.runas import RunAsError, parse_user

        try:
            user = parse_user(environment["BALLOONLAB_WORKLOAD_USER"])
        except RunAsError as exc:
            log.error("BALLOONLAB_WORKLOAD_USER: %s", exc)
            return 2
        workdir = Path(environment.get("BALLOONLAB_WORKLOAD_DIR") or tempfile.gettempdir())
    if not command:
        report = Path(environment.get("BALLOONLAB_WORKLOAD_REPORT")
                      or Path(tempfile.gettempdir()) / "balloonlab-workload.json")
        environment["BALLOONLAB_WORKLOAD_REPORT"] = str(report)
        command = [sys.executable, "-m", "guestagent.workload", "--size", "16MiB", "--phases", args.phases,
                   "--report-file", str(report)]
    stop = {"signal": 0}

    def request_stop(signum: int, _frame: object) -> None:
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        argv_, popen_arguments = workload_command(command, user, workdir)
        workload = subprocess.Popen(argv_, env=workload_environment(environment, workdir if user else None),
                                    **popen_arguments)
    except OSError as exc:
        log.error("cannot start the workload %s: %s", command[0], exc)
        return 127
    agent = subprocess.Popen([sys.executable, "-m", "guestagent"], env=environment)
    log.info("workload pid %d (%s) as %s, agent pid %d", workload.pid, " ".join(command[:4]),
             f"uid:gid {user[0]}:{user[1]}" if user else "this user", agent.pid)
    exit_code = 0
    while not stop["signal"]:
        if agent.poll() is not None:
            log.error("agent exited with %d: stopping the workload", agent.returncode)
            exit_code = agent.returncode
            break
        if workload.poll() is not None:
            log.error("workload exited with %d: stopping the agent", workload.returncode)
            exit_code = workload.returncode
            break
        time.sleep(0.2)
    if stop["signal"]:
        log.info("%s: stopping the agent (it deflates), then the workload", signal.Signals(stop["signal"]).name)
    _stop(agent, "agent")
    _stop(workload, "workload")
    return exit_code


if __name__ == "__main__":
    raise SystemExit(main())
