"""What hostd's core asks the host backend to do to a guest, and what failed.

The core decides (hostd.host_control), the reclaimer acts (hostd.reclaim) through a host
backend (cgroupfs or docker): these records and the backend's protocol are the interface.
The actions are NamedTuples, so a table test can still compare them with plain tuples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

HostVerb = Literal["limit", "freeze", "thaw", "pageout"]


class HostAction(NamedTuple):
    vm_id: str
    target: str  # the backend's name for the guest: a cgroup path or "docker:NAME"
    verb: HostVerb
    amount_bytes: int | None  # limit: the new limit (None: back to the guest's own); pageout: how much


class ActionFailure(NamedTuple):
    vm_id: str
    verb: HostVerb
    why: str


@dataclass(frozen=True, slots=True)
class CgroupReading:
    usage_bytes: int
    swap_bytes: int | None
    own_limit_bytes: int | None  # the limit before hostd changed anything


class HostBackend(Protocol):
    def usage_bytes(self, target: str) -> tuple[int, int | None]: ...
    def limit_bytes(self, target: str) -> int | None: ...
    def set_limit_bytes(self, target: str, limit_bytes: int | None) -> None: ...
    def set_frozen(self, target: str, frozen: bool) -> None: ...
