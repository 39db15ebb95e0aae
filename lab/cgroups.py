"""Memory cgroups the lab makes for its guests, v1 or v2: a parent `balloonlab-lab` (or the
name given) with one child per guest, limits for memory and memory + swap, and removal that
first kills whatever still runs inside. The code is the `cgroups` package's (cgroups.writer);
these are the lab's names for it."""

from __future__ import annotations

from cgroups import CgroupError, memory_cgroup_version, memory_hierarchy
from cgroups.reader import memory_and_swap as usage
from cgroups.writer import create_guest, create_parent, pids_in, remove

# One error type for cgroup file trouble: the cgroups package's.
CgroupSetupError = CgroupError
__all__ = ["CgroupSetupError", "create_guest", "create_parent", "memory_cgroup_version", "memory_hierarchy",
           "pids_in", "remove", "usage"]
