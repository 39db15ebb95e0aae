"""Exceptions of the guest agent.

    AgentError
      CgroupError(path, detail)      a cgroup file is missing or unreadable
      PinError(errno, requested_bytes, detail)   mmap/mlock failed
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of everything the agent raises on purpose."""


class CgroupError(AgentError):
    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.detail = detail


class PinError(AgentError):
    def __init__(self, errno: int, requested_bytes: int, detail: str) -> None:
        super().__init__(detail)
        self.errno = errno
        self.requested_bytes = requested_bytes
