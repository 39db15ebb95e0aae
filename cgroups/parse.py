"""Pure parsers of memory cgroup files, v1 and v2: text in, numbers and records out, no I/O.
A value the kernel does not provide is None ("unknown"), never 0.

Kernel notes: PSI files per cgroup (`memory.pressure`) need cgroup v2 and Linux ≥ 4.20;
`pswpin`/`pswpout` in v2 `memory.stat` need Linux ≥ 6.1 (else None). v1 has no per-cgroup
PSI and no swap in/out counters; there the agent relies on `memory.oom_control`,
`memory.failcnt` and the headroom arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from cgroups import UNLIMITED_V1_BYTES, CgroupError, parse_proc_cgroup

__all__ = ["READING_STATS_KEYS", "GuestReading", "Pressure", "parse_flat_keyed", "parse_limit", "parse_pressure",
           "parse_proc_cgroup", "parse_proc_self_cgroup", "reading_from_v1", "reading_from_v2"]

parse_proc_self_cgroup = parse_proc_cgroup  # the agent's name for it


@dataclass(frozen=True, slots=True)
class Pressure:
    some_avg10: float
    full_avg10: float
    some_total_us: int
    full_total_us: int


@dataclass(frozen=True, slots=True)
class GuestReading:
    """One snapshot of the guest's memory as its cgroup sees it. Bytes unless named."""

    cgroup_version: int
    limit_bytes: int | None  # None = no limit
    usage_bytes: int
    anon_bytes: int | None
    file_bytes: int | None
    active_anon_bytes: int | None
    inactive_anon_bytes: int | None
    active_file_bytes: int | None
    inactive_file_bytes: int | None
    unevictable_bytes: int | None
    swap_used_bytes: int | None
    swap_limit_bytes: int | None  # None = no limit (or unknown: see swap_accounting)
    swap_in_pages: int | None
    swap_out_pages: int | None
    minor_faults: int | None
    major_faults: int | None
    refault_anon_pages: int | None  # workingset_refault_anon (Linux ≥ 5.9): swapped pages needed again
    oom_events: int | None
    oom_kill_events: int | None
    high_events: int | None
    max_events: int | None
    psi_some_avg10: float | None
    psi_full_avg10: float | None
    psi_full_total_us: int | None

    def as_stats(self) -> dict[str, int | float | None]:
        """The `stats` map of a status message (names documented in protocol/README.md),
        with the virtio-balloon names where they map."""
        stats: dict[str, int | float | None] = {f.name: getattr(self, f.name) for f in fields(self)}
        stats["swap_in"] = self.swap_in_pages  # virtio VIRTIO_BALLOON_S_SWAP_IN
        stats["swap_out"] = self.swap_out_pages
        stats["major_faults"] = self.major_faults
        stats["minor_faults"] = self.minor_faults
        stats["total_memory"] = self.limit_bytes
        stats["free_memory"] = None if self.limit_bytes is None else max(0, self.limit_bytes - self.usage_bytes)
        stats["disk_caches"] = self.file_bytes
        return stats


# Every name `as_stats` fills, in a fixed order: the agent declares them once at hello.
READING_STATS_KEYS: tuple[str, ...] = tuple(dict.fromkeys(
    [f.name for f in fields(GuestReading)]
    + ["swap_in", "swap_out", "major_faults", "minor_faults", "total_memory", "free_memory", "disk_caches"]))


# ---- pure parsers ------------------------------------------------------------------------
def parse_flat_keyed(text: str) -> dict[str, int]:
    """`key value` lines (memory.stat, memory.events, memory.oom_control)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                values[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return values


def parse_limit(text: str) -> int | None:
    """A memory limit: v2 `max` or a number; v1 numbers ≥ 2^62 mean unlimited. None = no
    limit; anything else raises ValueError."""
    value = text.strip()
    if value == "max":
        return None
    number = int(value)
    return None if number >= UNLIMITED_V1_BYTES else number


def parse_pressure(text: str) -> Pressure:
    """`some avg10=.. avg60=.. avg300=.. total=..` and the same for `full` (PSI format)."""
    rows: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        kind, *pairs = line.split()
        rows[kind] = dict(pair.split("=", 1) for pair in pairs)
    try:
        return Pressure(
            some_avg10=float(rows["some"]["avg10"]),
            full_avg10=float(rows["full"]["avg10"]),
            some_total_us=int(rows["some"]["total"]),
            full_total_us=int(rows["full"]["total"]),
        )
    except (KeyError, ValueError) as exc:
        raise CgroupError.at("memory.pressure", f"unexpected PSI format: {exc}") from exc


def _pick(stat: dict[str, int], *names: str) -> int | None:
    for name in names:
        if name in stat:
            return stat[name]
    return None


def reading_from_v1(files: dict[str, str]) -> GuestReading:
    """v1: memory.{stat,usage_in_bytes,limit_in_bytes,oom_control} and, with swap accounting,
    memory.memsw.{usage,limit}_in_bytes. Hierarchical `total_*` values are preferred."""
    stat = parse_flat_keyed(files["memory.stat"])
    usage = int(files["memory.usage_in_bytes"])
    limit = parse_limit(files["memory.limit_in_bytes"])
    oom = parse_flat_keyed(files.get("memory.oom_control", ""))
    swap_used = _pick(stat, "total_swap", "swap")
    swap_limit = None
    if "memory.memsw.limit_in_bytes" in files:
        memsw_limit = parse_limit(files["memory.memsw.limit_in_bytes"])
        if memsw_limit is not None and limit is not None:
            swap_limit = max(0, memsw_limit - limit)
    return GuestReading(
        cgroup_version=1,
        limit_bytes=limit,
        usage_bytes=usage,
        anon_bytes=_pick(stat, "total_rss", "rss"),
        file_bytes=_pick(stat, "total_cache", "cache"),
        active_anon_bytes=_pick(stat, "total_active_anon", "active_anon"),
        inactive_anon_bytes=_pick(stat, "total_inactive_anon", "inactive_anon"),
        active_file_bytes=_pick(stat, "total_active_file", "active_file"),
        inactive_file_bytes=_pick(stat, "total_inactive_file", "inactive_file"),
        unevictable_bytes=_pick(stat, "total_unevictable", "unevictable"),
        swap_used_bytes=swap_used,
        swap_limit_bytes=swap_limit,
        swap_in_pages=None,
        swap_out_pages=None,
        minor_faults=_pick(stat, "total_pgfault", "pgfault"),
        major_faults=_pick(stat, "total_pgmajfault", "pgmajfault"),
        refault_anon_pages=_pick(stat, "total_workingset_refault_anon", "workingset_refault_anon"),
        oom_events=None,
        oom_kill_events=oom.get("oom_kill"),
        high_events=None,
        max_events=int(files["memory.failcnt"]) if "memory.failcnt" in files else None,
        psi_some_avg10=None,
        psi_full_avg10=None,
        psi_full_total_us=None,
    )


def reading_from_v2(files: dict[str, str]) -> GuestReading:
    """v2: memory.{stat,current,max,events,pressure,swap.current,swap.max}."""
    stat = parse_flat_keyed(files["memory.stat"])
    events = parse_flat_keyed(files.get("memory.events", ""))
    pressure = parse_pressure(files["memory.pressure"]) if "memory.pressure" in files else None
    return GuestReading(
        cgroup_version=2,
        limit_bytes=parse_limit(files["memory.max"]),
        usage_bytes=int(files["memory.current"]),
        anon_bytes=stat.get("anon"),
        file_bytes=stat.get("file"),
        active_anon_bytes=stat.get("active_anon"),
        inactive_anon_bytes=stat.get("inactive_anon"),
        active_file_bytes=stat.get("active_file"),
        inactive_file_bytes=stat.get("inactive_file"),
        unevictable_bytes=stat.get("unevictable"),
        swap_used_bytes=int(files["memory.swap.current"]) if "memory.swap.current" in files else None,
        swap_limit_bytes=parse_limit(files["memory.swap.max"]) if "memory.swap.max" in files else None,
        swap_in_pages=stat.get("pswpin"),
        swap_out_pages=stat.get("pswpout"),
        minor_faults=stat.get("pgfault"),
        major_faults=stat.get("pgmajfault"),
        refault_anon_pages=stat.get("workingset_refault_anon"),
        oom_events=events.get("oom"),
        oom_kill_events=events.get("oom_kill"),
        high_events=events.get("high"),
        max_events=events.get("max"),
        psi_some_avg10=pressure.some_avg10 if pressure else None,
        psi_full_avg10=pressure.full_avg10 if pressure else None,
        psi_full_total_us=pressure.full_total_us if pressure else None,
    )
