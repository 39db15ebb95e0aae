"""A wake-up when the guest's memory usage crosses a threshold (cgroup v1 memory thresholds).

The agent checks the guest every `check_interval_ms` (100 ms). A workload that suddenly
writes a new buffer fills 100 MiB in less than that; in a guest without swap the charge that
finds no room ends in the cgroup's OOM killer long before the next check (issue 18: one run
in two OOM-killed with a 256 MiB balloon). cgroup v1 signals an eventfd each time usage
crosses a registered threshold (checked by the kernel every 128 charged pages, ~512 KiB), so
the loop polls that fd beside its socket and checks the guest at once (the agent arms it two
safety margins below the limit). A wake-up is only a check: the decisions are the same.

Registration: write "<eventfd> <fd of memory.usage_in_bytes> <threshold>" to
cgroup.event_control. Closing the eventfd removes it. cgroup v2 has no usage thresholds
(PSI triggers are the v2 analogue); there, and where cgroup.event_control is not writable
(a read-only cgroupfs in a container), the agent keeps its periodic check only.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class UsageAlarm:
    def __init__(self, cgroup_path: Path) -> None:
        self.path = cgroup_path
        self.fd: int | None = None
        self.threshold: int | None = None
        self.failed = False

    @classmethod
    def for_cgroup(cls, cgroup_path: Path, version: int) -> UsageAlarm | None:
        if version != 1 or not hasattr(os, "eventfd") or not (cgroup_path / "cgroup.event_control").exists():
            return None
        return cls(cgroup_path)

    def arm(self, threshold: int) -> bool:
        """Signal when usage crosses `threshold` (either way). Returns whether the fd changed
        (the caller polls the new one)."""
        if self.failed or threshold == self.threshold or threshold <= 0:
            return False
        self.close()
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            usage_fd = os.open(self.path / "memory.usage_in_bytes", os.O_RDONLY | os.O_CLOEXEC)
            try:
                (self.path / "cgroup.event_control").write_text(f"{efd} {usage_fd} {threshold}")
            finally:
                os.close(usage_fd)
        except OSError as exc:
            os.close(efd)
            self.failed = True
            log.info("no usage threshold notifications (%s): pressure is checked every interval only", exc)
            return False
        self.fd, self.threshold = efd, threshold
        return True

    def drain(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(BlockingIOError, OSError):
                os.eventfd_read(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
        self.fd, self.threshold = None, None
