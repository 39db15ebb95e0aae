"""Exceptions of the guest agent.

    AgentError
      PinError(errno, requested_bytes, detail)   mmap/mlock failed
    CgroupError (cgroups.CgroupError)            a cgroup file is missing or unreadable; the
                                                 cgroups package's one error, re-exported here
"""

from __future__ import annotations

from cgroups import CgroupError

__all__ = ["AgentError", "CgroupError", "PinError"]


class AgentError(Exception):
    """Base of everything the agent raises on purpose (cgroup trouble is a CgroupError)."""


class PinError(AgentError):
    def __init__(self, errno: int, requested_bytes: int, detail: str) -> None:
        super().__init__(detail)
        self.errno = errno
        self.requested_bytes = requested_bytes
