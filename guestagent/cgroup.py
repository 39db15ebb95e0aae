"""The guest's memory statistics from its memory cgroup, v1 or v2: the agent's names for what
lives in the `cgroups` package (parsers in cgroups.parse, the reader in cgroups.reader)."""

from __future__ import annotations

from cgroups import UNLIMITED_V1_BYTES
from cgroups.parse import (
    READING_STATS_KEYS,
    GuestReading,
    Pressure,
    parse_flat_keyed,
    parse_limit,
    parse_pressure,
    parse_proc_self_cgroup,
    reading_from_v1,
    reading_from_v2,
)
from cgroups.reader import CgroupReader

__all__ = ["READING_STATS_KEYS", "UNLIMITED_V1_BYTES", "CgroupReader", "GuestReading", "Pressure",
           "parse_flat_keyed", "parse_limit", "parse_pressure", "parse_proc_self_cgroup", "reading_from_v1",
           "reading_from_v2"]
