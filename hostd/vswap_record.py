"""The vswap record's file: where hostd writes, before it squeezes or freezes a guest, what it
must undo (hostd/reclaim.py decides what goes in it).

The directory is created 0700 and must be owned by hostd's user and not group- or
world-writable (else nothing is written, so nothing is squeezed); it is opened without
following a symlink. Writes are durable (hostd/statefile.py: a random O_EXCL temp name, fsync,
rename, fsync of the directory); an empty record removes the file. A load trusts only a regular
file owned by hostd's user that nobody else can write, up to 16 MiB of JSON object; anything
else is logged and recovers nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

from hostd.cgroupfs import BackendError
from hostd.statefile import write_atomically

log = logging.getLogger("hostd.reclaim")

MAX_RECORD_BYTES = 16 << 20
MIN_OWN_LIMIT_BYTES = 4096  # a recorded own limit outside these is not one hostd could have seen (S24)
MAX_OWN_LIMIT_BYTES = 1 << 50
RECORD_FLAGS = ("limited", "freezing", "frozen")


def record_entry(raw: Any) -> dict[str, Any] | None:
    """A record entry, normalised; None when it is not one hostd writes. Entries of the first
    format ({"own_limit_bytes", "frozen"}) count as limited and, if frozen, as frozen."""
    if not isinstance(raw, dict):
        return None
    own = raw.get("own_limit_bytes")
    if own is not None and (type(own) is not int or not MIN_OWN_LIMIT_BYTES <= own <= MAX_OWN_LIMIT_BYTES):
        return None
    flags = {name: raw.get(name, name == "limited") for name in RECORD_FLAGS}
    if not all(type(value) is bool for value in flags.values()):
        return None
    return {"own_limit_bytes": own, **flags}


class RecordError(BackendError):
    """The write-ahead record cannot be written: the action that needed it is refused."""


class RecordFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.problem: str | None = None  # the last write failure (logged once, and its recovery)

    def _open_dir(self) -> int:
        """The record's directory (created 0700), opened without following a symlink, and
        checked: owned by hostd's user, writable by nobody else."""
        directory = self.path.parent
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise RecordError(f"vswap record directory {directory}: {exc.strerror or exc}") from None
        info = os.fstat(fd)
        problem = None
        if info.st_uid != os.geteuid():
            problem = f"owned by uid {info.st_uid}, not hostd's ({os.geteuid()})"
        elif info.st_mode & 0o022:
            problem = f"mode {stat.S_IMODE(info.st_mode):o} lets others write to it (make it 0700)"
        if problem is not None:
            os.close(fd)
            raise RecordError(f"vswap record directory {directory}: {problem}")
        return fd

    def write(self, content: dict[str, Any]) -> None:
        """`content` durably; RecordError if not (logged once per reason)."""
        name = self.path.name
        try:
            directory = self._open_dir()
        except RecordError as exc:
            self._note_problem(str(exc))
            raise
        try:
            if not content:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=directory)
                os.fsync(directory)  # the unlink itself survives a power loss
            else:
                write_atomically(directory, name, json.dumps(content, sort_keys=True).encode())
        except OSError as exc:
            error = RecordError(f"cannot write the vswap record {self.path}: {exc.strerror or exc}")
            self._note_problem(str(error))
            raise error from None
        finally:
            os.close(directory)
        if content and self.problem is not None:  # (removing a file that is not there proves nothing)
            log.info("vswap record %s writable again", self.path)
            self.problem = None

    def _note_problem(self, problem: str) -> None:
        if problem != self.problem:
            log.error("%s: hostd will neither lower a limit nor freeze a guest until it can", problem)
            self.problem = problem

    def load(self) -> dict[str, Any]:
        """The previous hostd's record: {} when there is none or it cannot be trusted."""
        try:
            directory = self._open_dir()
        except RecordError as exc:
            log.error("%s: nothing recovered", exc)
            return {}
        try:
            fd = os.open(self.path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.error("vswap record %s unreadable (%s): nothing recovered", self.path, exc.strerror or exc)
            return {}
        finally:
            os.close(directory)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
                log.error("vswap record %s is not a file only hostd's user can write (uid %d, mode %o): "
                          "nothing recovered, and it will be replaced", self.path, info.st_uid,
                          stat.S_IMODE(info.st_mode))
                return {}
            with os.fdopen(fd, "rb") as file:
                fd = -1
                record = json.loads(file.read(MAX_RECORD_BYTES))
        except (OSError, ValueError) as exc:
            log.error("vswap record %s unreadable (%s): nothing recovered", self.path, exc)
            return {}
        finally:
            if fd >= 0:
                os.close(fd)
        if not isinstance(record, dict):
            log.error("vswap record %s is not a JSON object: nothing recovered", self.path)
            return {}
        return record
