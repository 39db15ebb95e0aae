"""hostd's small state files (the vswap record, balloonctl's saved settings): written durably.

    write_atomically(directory_fd, name, data)
    write_private_json(path, document)      a JSON document so, 0600 in a 0700 directory
    load_settings(path)                     balloonctl's saved settings, {} when absent or unusable

A fresh random temp name opened O_EXCL|O_NOFOLLOW (nothing can be pre-created under it), mode
0600, fsync, rename over `name`, then fsync of the directory so the rename survives a power
loss. OSError on failure, with the temp file removed. The directory is the caller's, opened by
it with whatever checks its file needs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from hostd.jsonout import dumps

log = logging.getLogger("hostd.server")


def write_atomically(directory_fd: int, name: str, data: bytes) -> None:
    temporary = f".{name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=directory_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(temporary, name, src_dir_fd=directory_fd, dst_dir_fd=directory_fd)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temporary, dir_fd=directory_fd)
        raise
    os.fsync(directory_fd)


def load_settings(path: Path | None) -> dict[str, Any]:
    if path is None or not path.exists():
        return {}
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.error("settings file %s not used: %s", path, exc)
        return {}
    return document if isinstance(document, dict) else {}


def write_private_json(path: Path, document: dict[str, Any]) -> None:
    """Atomically and durably, mode 0600 (hostd/statefile.py, as the vswap record)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        write_atomically(directory, path.name, dumps(document, indent=1).encode())
    finally:
        os.close(directory)
