"""hostd's small state files (the vswap record, balloonctl's saved settings): written durably.

    write_atomically(directory_fd, name, data)

A fresh random temp name opened O_EXCL|O_NOFOLLOW (nothing can be pre-created under it), mode
0600, fsync, rename over `name`, then fsync of the directory so the rename survives a power
loss. OSError on failure, with the temp file removed. The directory is the caller's, opened by
it with whatever checks its file needs.
"""

from __future__ import annotations

import contextlib
import os
import secrets


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
