"""What hostd's core asks the host backend to do to a guest, and what failed.

The core decides (hostd.host_control), the reclaimer acts (hostd.reclaim): these records are
the whole interface between the two. NamedTuples, so a table test can still compare them with
plain tuples.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

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
