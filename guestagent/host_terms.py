"""What the agent accepts from its host, pure: floors on the periods a welcome or a settings
message may set, the verdict on a target's sequence number, the pages an unlock may name, and
the workload's report turned into status stats. A host is a peer too: without CURVE anything
that reaches the agent can answer its hello (review S20)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal

from protocol import PageRanges

# Floors on the periods a welcome may set. Without CURVE anything that reaches the agent's
# endpoint can answer its hello (review S20): 10 ms reports and heartbeats, or a 100 ms
# clear_refs sampling period (a walk of every page table of the guest's processes), would
# cost the guest CPU for nothing, and a host timeout far below the heartbeat round trip would
# make the agent drop a healthy host. hostd itself uses 1 s reports, a 5 s+ host timeout and
# a sampling period of seconds (Mem.SamplePeriod): the floors sit well below what a real host
# asks and well above what only hurts.
MIN_REPORT_INTERVAL_MS = 200
MIN_HOST_TIMEOUT_MS = 1_000
MIN_SAMPLE_PERIOD_MS = 1_000

# A set_target whose seq jumps this far above the session's high-water mark is not the host's:
# one spoofed seq near 2**63 would otherwise mute every real target for the session (the agent
# ignores seqs below its high-water mark). hostd numbers targets with one counter for all of
# its vms, so a vm whose target stays put sees the counter run ahead by the others' changes:
# the bound also grows with the time since the last accepted target (100,000 a second is 10
# recomputes a second of 10,000 vms each changing target), and a spoofed 2**63 stays absurd
# for millions of years.
MAX_TARGET_SEQ_JUMP = 1_000_000
TARGET_SEQ_JUMP_PER_S = 100_000


@dataclass(frozen=True, slots=True)
class HostTimings:
    report_interval_ms: int
    host_timeout_ms: int
    sample_period_ms: int | None  # None: the welcome set none: keep ours
    floored: tuple[str, ...]  # the names a floor raised (logged by the caller)


def welcome_timings(report_interval_ms: int, host_timeout_ms: int, sample_period_ms: int | None) -> HostTimings:
    """The periods a welcome (or a later `settings`) asks for, each raised to its floor.
    `sample_period_ms` None: the host sets none, the agent keeps its own."""
    floored: list[str] = []

    def floor(name: str, value: int, minimum: int) -> int:
        if value < minimum:
            floored.append(name)
            return minimum
        return value

    report = floor("report_interval_ms", report_interval_ms, MIN_REPORT_INTERVAL_MS)
    timeout = floor("host_timeout_ms", host_timeout_ms, MIN_HOST_TIMEOUT_MS)
    sample = None if sample_period_ms is None else floor("sample_period_ms", sample_period_ms,
                                                         MIN_SAMPLE_PERIOD_MS)
    return HostTimings(report, timeout, sample, tuple(floored))


def floor_sample_period(sample_period_ms: int) -> tuple[int, bool]:
    """A pushed sampling period raised to the agent's floor: (period, whether it was raised)."""
    return max(sample_period_ms, MIN_SAMPLE_PERIOD_MS), sample_period_ms < MIN_SAMPLE_PERIOD_MS


TargetSeqVerdict = Literal["new", "stale", "absurd"]


def classify_target_seq(seq: int, high_water: int, since_accepted_ms: int) -> TargetSeqVerdict:
    """A target's seq against the session's high-water mark (0: none accepted yet).

    0 means the host set no target yet, and a seq below the mark is older than one already
    followed: both "stale". The mark itself is "new" again (lock/unlock replies repeat it).
    The first seq of a session sets the mark whatever it is (a host that ran for a week has a
    large counter); after that a jump beyond `MAX_TARGET_SEQ_JUMP` plus the time allowance
    is "absurd" and ignored."""
    if seq == 0 or seq < high_water:
        return "stale"
    if high_water:
        allowance = MAX_TARGET_SEQ_JUMP + TARGET_SEQ_JUMP_PER_S * max(0, since_accepted_ms) // 1000
        if seq - high_water > allowance:
            return "absurd"
    return "new"


def subtract_pages(pages: PageRanges, held: PageRanges) -> PageRanges:
    """`pages` less `held` (both canonical: sorted, disjoint), in one pass over both. An unlock
    whose reply never came is sent again after the re-hello, but only for pages the balloon
    does not hold again meanwhile (a freed range may have been pinned anew: PFNs get reused,
    and VPN slots are refilled first-fit)."""
    out: list[tuple[int, int]] = []
    other = held.ranges
    j = 0
    for start, count in pages.ranges:
        end = start + count
        while j < len(other) and other[j][0] + other[j][1] <= start:
            j += 1
        k = j
        while start < end:
            if k >= len(other) or other[k][0] >= end:
                out.append((start, end - start))
                break
            h_start, h_end = other[k][0], other[k][0] + other[k][1]
            if h_start > start:
                out.append((start, h_start - start))
            start = max(start, h_end)
            k += 1
    return PageRanges.from_ranges(out)


WORKLOAD_REPORT_FIELDS = {  # balloon-workload report field → status stats name
    "touches_per_s": "workload_touches_per_s",
    "latency_p50_us": "workload_latency_p50_us",
    "latency_p99_us": "workload_latency_p99_us",
    "size_bytes": "workload_size_bytes",
}


def workload_stats(report_text: str, now_s: float, max_age_s: float = 10.0) -> dict[str, int | float]:
    """The numbers of a fresh balloon-workload report, renamed for `status.stats`; nothing
    when the report is stale, malformed or not numbers (the workload is not ours to trust)."""
    try:
        report = json.loads(report_text)
    except ValueError:
        return {}
    if not isinstance(report, dict):
        return {}
    ts = report.get("ts")
    if not isinstance(ts, int | float) or isinstance(ts, bool) or not 0 <= now_s - ts <= max_age_s:
        return {}
    stats: dict[str, int | float] = {}
    for field, name in WORKLOAD_REPORT_FIELDS.items():
        value = report.get(field)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) \
                and 0 <= value < 1 << 53:
            stats[name] = value
    return stats
