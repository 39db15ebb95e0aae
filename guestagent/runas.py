"""Run a guest's workload as an unprivileged user: the lab's guests are untrusted.

    python -m guestagent.runas --user UID:GID --dir DIR MODULE [ARGS...]

For this project's own Python workloads (balloon-workload, lab.skewload): started as root,
imports MODULE (and with it everything it needs) while the interpreter and the project can
still be read, then enters DIR (the guest's own 0700 directory, owned by UID), drops every
supplementary group, the gid and the uid, and only then calls MODULE.main(ARGS): before the
workload maps or touches any memory. That works even when the interpreter or the project
lives under a directory UID cannot enter (a venv under /root). The process stays where it
was started, in the guest's memory cgroup, so its pages are charged to the guest as before.

Any other command is started by balloon-guest with subprocess's user=/group=/extra_groups=[]
(`drop_popen_arguments`): its executable must then be one UID can run.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import os
import pwd
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Modules that may be started as root and drop privileges themselves: ours, whose import-time
# code is known. A third-party workload never runs as root before the drop.
PYTHON_WORKLOADS = frozenset({"guestagent.workload", "lab.skewload"})
WORKLOAD_UMASK = 0o077
PR_SET_NO_NEW_PRIVS = 38
_libc = ctypes.CDLL(None, use_errno=True)


class RunAsError(Exception):
    """The workload user is not valid, or the drop did not take."""


def parse_user(text: str) -> tuple[int, int]:
    """"NAME" (its primary group), "UID" (gid = uid) or "UID:GID"."""
    text = text.strip()
    if not text:
        raise RunAsError("empty workload user")
    name, sep, group = text.partition(":")
    try:
        if name.isdigit():
            uid = int(name)
            gid = int(group) if sep else uid
        else:
            entry = pwd.getpwnam(name)
            uid, gid = entry.pw_uid, (int(group) if sep else entry.pw_gid)
    except KeyError:
        raise RunAsError(f"no user {name!r} on this host") from None
    except ValueError:
        raise RunAsError(f"workload user {text!r}: NAME, UID or UID:GID") from None
    if not (0 <= uid < 2**32 - 1 and 0 <= gid < 2**32 - 1):
        raise RunAsError(f"workload user {text!r}: uid and gid must be 0..{2**32 - 2}")
    return uid, gid


def no_new_privileges() -> None:
    """PR_SET_NO_NEW_PRIVS: no setuid/setgid binary or file capability gives the workload (or
    anything it runs) more than it has."""
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def drop_privileges(uid: int, gid: int) -> None:
    """setgroups([]) → setgid → setuid (in that order: after setuid the others are refused),
    then check that there is no way back."""
    no_new_privileges()
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    os.umask(WORKLOAD_UMASK)
    if uid != 0:
        if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
            raise RunAsError(f"privileges not dropped: uids {os.getresuid()}, gids {os.getresgid()}, "
                             f"groups {os.getgroups()}")
        try:
            os.setuid(0)
        except PermissionError:
            return
        raise RunAsError("setuid(0) still works after the drop")


def drop_popen_arguments(uid: int, gid: int, workdir: Path) -> dict[str, Any]:
    """subprocess.Popen's arguments for a command run as uid:gid from the start."""
    return {"user": uid, "group": gid, "extra_groups": [], "umask": WORKLOAD_UMASK, "cwd": str(workdir),
            "preexec_fn": no_new_privileges}


def _relative_to(path_text: str, workdir: Path) -> str:
    """A path inside workdir, relative to it: after the drop the path to workdir may not be
    traversable (a 0700 parent), while the workload's cwd is workdir itself."""
    path = Path(path_text)
    if path.is_absolute() and path.parent == workdir:
        return path.name
    return path_text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guestagent.runas", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--user", required=True, help="UID:GID, UID or NAME to run the workload as")
    parser.add_argument("--dir", type=Path, required=True, help="the workload's own directory (its cwd)")
    parser.add_argument("module", help=f"one of {sorted(PYTHON_WORKLOADS)}")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.module not in PYTHON_WORKLOADS:
        parser.error(f"{args.module}: only {sorted(PYTHON_WORKLOADS)} drop privileges themselves")
    try:
        uid, gid = parse_user(args.user)
    except RunAsError as exc:
        parser.error(str(exc))
    workload_args = list(args.args)
    workdir = args.dir.resolve()
    module = importlib.import_module(args.module)  # as root: everything it imports is loaded now
    os.chdir(workdir)
    workload_args = [_relative_to(a, workdir) for a in workload_args]
    report = os.environ.get("BALLOONLAB_WORKLOAD_REPORT")
    if report:
        os.environ["BALLOONLAB_WORKLOAD_REPORT"] = _relative_to(report, workdir)
    try:
        drop_privileges(uid, gid)
    except (OSError, RunAsError) as exc:
        print(f"guestagent.runas: cannot run {args.module} as {uid}:{gid}: {exc}", file=sys.stderr)
        return 126
    sys.argv = [args.module, *workload_args]
    result: int = module.main(workload_args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
