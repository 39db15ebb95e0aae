"""The balloon driver's decisions, as pure functions over snapshots (no I/O, time passed in).

    givable_bytes(reading, host_swap_free)   how much more the guest can give without an OOM kill
    detect_pressure(previous, current, ...)  does the guest's own workload need memory back?
    workload_growth(previous, current, ...)  ...suddenly, by writing new memory into the limit?
    next_rate(rate, succeeded)              vmw_balloon's adaptive rate: halve on failure, grow on success
    after_pressure(backoff, ...)            remember where pressure struck: a ceiling and a pause (AIMD)
    inflate_ceiling_pages(backoff, now)     how far inflation may go while that memory lasts
    workload_stats(report_text, now_s)      the workload's own report, as status stats (or none)
    plan(...)                               the next step: inflate / deflate / hold / refuse, with a reason
    welcome_timings(...)                    the periods a welcome sets, floored (the host's word is a hint)
    classify_target_seq(...)                a target's seq: new, stale, or an absurd jump to ignore
    subtract_pages(pages, held)             page numbers not held any more (unlocks to send again)

(workload_stats, welcome_timings, classify_target_seq and subtract_pages live in
guestagent.host_terms: what the agent accepts from its host. They are importable from here.)

vmw_balloon allocates with __GFP_NORETRY so the balloon never triggers the guest's OOM killer;
mlock in a cgroup has no such flag (it reclaims, then OOM-kills), so the agent must stop short
itself: `givable_bytes` is that check, made before every batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from guestagent.cgroup import GuestReading
from guestagent.host_terms import (  # what the host may set: re-exported for guestagent.agent's callers
    MAX_TARGET_SEQ_JUMP,
    MIN_HOST_TIMEOUT_MS,
    MIN_REPORT_INTERVAL_MS,
    MIN_SAMPLE_PERIOD_MS,
    TARGET_SEQ_JUMP_PER_S,
    WORKLOAD_REPORT_FIELDS,
    HostTimings,
    TargetSeqVerdict,
    classify_target_seq,
    floor_sample_period,
    subtract_pages,
    welcome_timings,
    workload_stats,
)
from protocol import PAGE_SIZE_BYTES

Action = Literal["inflate", "deflate", "hold", "refuse"]


@dataclass(frozen=True, slots=True)
class PacingConfig:
    batch_pages: int = 512  # one lock message, like vmw_balloon's batch page
    # Batches in flight at most: hides the round trip per batch. 32 batches = 64 MiB: with
    # 8 (16 MiB, one chunk) the agent waited for the host's answers once per chunk, ~9 % of a
    # 1 GiB inflate at free memory (issue 18). The adaptive rate still starts at one batch.
    max_rate_batches: int = 32
    pin_chunk_batches: int = 8  # batches pinned by one mlock call (16 MiB)
    min_margin_bytes: int = 24 << 20  # always leave this much for the workload...
    margin_ratio: float = 0.06  # ...or this fraction of the guest's memory, whichever is larger
    file_reclaimable_ratio: float = 0.8  # keep some page cache: the workload's own code lives there
    psi_full_threshold: float = 10.0  # % of time all tasks stalled on memory (v2 PSI avg10)
    pressure_deflate_ratio: float = 0.25  # release a quarter of the balloon at once on pressure
    pressure_pause_ms: int = 5_000  # then no inflation for 5 s (vmw_balloon VMBALLOON_SHRINK_DELAY)
    refusal_pause_ms: int = 1_000  # after "the guest has nothing left", retry next cycle
    swap_step_bytes: int = 4 << 20  # per check: memory that must come from swapping the workload out
    refault_ratio_per_s: float = 0.01  # anon refaults/s above 1 % of memsz = thrashing
    # failcnt / memory.events max rising this fast while we hold = squeezed; at the limit any
    # allocation counts (a report file, a sample), and 3 hits in one 100 ms check were seen
    # in an idle lab guest
    limit_hits_per_s: float = 100.0
    squeezed_refault_share: float = 0.25  # ...counted only with refaults above a quarter of thrashing
    max_pressure_pause_ms: int = 60_000  # the pause doubles with each pressure episode in a row, up to this
    ceiling_relax_bytes_per_s: int = 8 << 20  # after the first pause the ceiling creeps up this fast
    ceiling_doubling_ms: int = 5_000  # ...and that creep doubles this often while no pressure comes
    pressure_cooldown_ms: int = 1_000  # refaults / limit hits right after a pressure deflate are its echo
    pressure_forget_ms: int = 120_000  # no pressure for this long: forget the ceiling and the streak
    growth_min_bytes: int = 4 << 20  # the workload's own anon growth that counts as a sudden need...
    growth_bytes_per_s: int = 32 << 20  # ...when this fast (a grow-at-48-MiB/s workload counts)
    growth_lookahead_s: float = 0.5  # a sudden need gets what it will take this long at its rate
    growth_horizon_s: float = 0.1  # ...when the room left would not last it this long (one check)


@dataclass(frozen=True, slots=True)
class Plan:
    action: Action
    pages: int
    reason: str
    transient: bool = False  # a refusal that the next check (a new swap step) may lift


def margin_bytes(reading: GuestReading, cfg: PacingConfig) -> int:
    return _margin_for_limit(reading.limit_bytes or 0, cfg)


def _margin_for_limit(limit_bytes: int, cfg: PacingConfig) -> int:
    return max(cfg.min_margin_bytes, int(limit_bytes * cfg.margin_ratio))


def givable_bytes(reading: GuestReading, host_swap_free_bytes: int, host_available_bytes: int,
                  cfg: PacingConfig, paced: bool = True) -> int:
    """Bytes the guest can give to the balloon now without an OOM kill: free room below its
    limit, most of its page cache, and — at most `swap_step_bytes` per check — inactive
    anonymous memory its swap can take, minus a safety margin. Negative: already short.

    The active anonymous list is the workload's working set: pinning memory that can only be
    had by swapping hot pages makes the guest thrash, and memcg reclaim that cannot keep up
    ends in an OOM kill (seen in the by-hand lab). Swap-backed pinning is paced per check
    because the kernel must write those pages out before it can hand them over; with
    `paced=False` the figure is the guest's whole headroom, every anonymous page its swap can
    take included (for pressure detection: below zero, the guest is really short)."""
    if reading.limit_bytes is None:
        room = host_available_bytes  # an unlimited cgroup competes with the whole host
    else:
        room = reading.limit_bytes - reading.usage_bytes
    file_bytes = (reading.active_file_bytes or 0) + (reading.inactive_file_bytes or 0)
    cache = int(file_bytes * cfg.file_reclaimable_ratio)
    swap_room = host_swap_free_bytes
    if reading.swap_limit_bytes is not None:
        swap_room = min(swap_room, reading.swap_limit_bytes - (reading.swap_used_bytes or 0))
    swappable = max(0, min(reading.inactive_anon_bytes or 0, swap_room))
    if not paced:
        # For the pressure check all anonymous memory counts: an idle workload's pages sit on
        # the active list until reclaim ages them, and at the limit that is the normal state
        # of a balloon that is swapping the guest. A hot working set shows up as refaults
        # (thrashing), which `detect_pressure` watches separately.
        anon = (reading.active_anon_bytes or 0) + (reading.inactive_anon_bytes or 0)
        return room + cache + max(0, min(anon, swap_room)) - margin_bytes(reading, cfg)
    # The kernel swaps only when a charge hits the limit: a swap step is allowed even when free
    # room is inside the margin, or nothing would ever move to swap (the unpaced headroom,
    # checked for pressure, still guards against a real shortage).
    return max(0, room + cache - margin_bytes(reading, cfg)) + min(swappable, cfg.swap_step_bytes)


def _rose(previous: int | None, current: int | None) -> bool:
    return previous is not None and current is not None and current > previous


def detect_pressure(previous: GuestReading | None, current: GuestReading, givable: int,
                    cfg: PacingConfig, interval_s: float = 0.1, pinned_since_last: bool = False,
                    soft_signals: bool = True) -> str | None:
    """A reason to deflate at once, or None. Signals: OOM events, memory.high events, PSI
    full above threshold (v2), anonymous refaults above `refault_ratio_per_s` of memsz per
    second (thrashing; both versions, Linux ≥ 5.9), the limit being hit often while the agent
    pinned nothing (v1 failcnt, v2 memory.events max), or no headroom left (givable < 0).
    `soft_signals=False` (see `soft_pressure_counts`) checks only OOM events and the headroom."""
    if previous is not None and not soft_signals:
        if _rose(previous.oom_kill_events, current.oom_kill_events):
            return "oom_kill in guest"
        if _rose(previous.oom_events, current.oom_events):
            return "oom event in guest"
    elif previous is not None:
        refaults_per_s = 0.0
        if _rose(previous.refault_anon_pages, current.refault_anon_pages) and interval_s > 0:
            assert previous.refault_anon_pages is not None and current.refault_anon_pages is not None
            refaults_per_s = (current.refault_anon_pages - previous.refault_anon_pages) / interval_s
        thrash_per_s = cfg.refault_ratio_per_s * (current.limit_bytes or 0) / PAGE_SIZE_BYTES
        if current.limit_bytes and refaults_per_s > thrash_per_s:
            return f"thrashing: {refaults_per_s:.0f} anon refaults/s > {thrash_per_s:.0f}"
        # Hitting the limit is how a balloon makes the kernel swap, and at the limit any new
        # process counts thousands of hits (a container's healthcheck: 4,000/s seen). It means
        # the workload is squeezed only while the agent pinned nothing and the workload is
        # also paging its own memory back in.
        if (not pinned_since_last and _rose(previous.max_events, current.max_events) and interval_s > 0
                and refaults_per_s > thrash_per_s * cfg.squeezed_refault_share):
            assert previous.max_events is not None and current.max_events is not None
            hits = (current.max_events - previous.max_events) / interval_s
            if hits > cfg.limit_hits_per_s:
                return (f"guest at its limit {hits:.0f} times/s while the balloon held still "
                        f"({refaults_per_s:.0f} anon refaults/s)")
        if _rose(previous.oom_kill_events, current.oom_kill_events):
            return "oom_kill in guest"
        if _rose(previous.oom_events, current.oom_events):
            return "oom event in guest"
        if _rose(previous.high_events, current.high_events):
            return "memory.high event in guest"
    if soft_signals and current.psi_full_avg10 is not None and current.psi_full_avg10 >= cfg.psi_full_threshold:
        return f"PSI full avg10 {current.psi_full_avg10:.1f}% ≥ {cfg.psi_full_threshold:.1f}%"
    if givable < 0:
        return f"headroom gone ({givable >> 20} MiB short of the safety margin)"
    return None


def workload_growth(previous: GuestReading | None, current: GuestReading, balloon_delta_bytes: int,
                    interval_s: float, cfg: PacingConfig) -> tuple[str, int] | None:
    """(reason, shortfall bytes) when the guest's own demand grows fast into its limit while
    the balloon holds memory, else None.

    With swap, the unpaced headroom counts every anonymous page swap could take, so a
    workload writing a new buffer never makes it negative: the kernel swaps the workload's
    older pages out (major faults later) while the balloon keeps its pages. A balloon is to
    give way to the guest's own need first. Demand = growth of usage plus growth of swap (at
    the limit usage stands still while the kernel swaps), less the balloon's own pins and
    releases: a balloon that pushes an idle workload into swap makes exactly the swap its pins
    displace, so that squeeze never counts. ≥ `growth_min_bytes` at ≥ `growth_bytes_per_s`,
    when the free room and most of the cache cannot take another interval of it, is a need.
    (Usage and swap come from the page counters, which are exact; memory.stat's anon and
    swap figures lag by up to seconds on recent kernels.)"""
    if previous is None or interval_s <= 0 or current.limit_bytes is None:
        return None
    swap_growth = (current.swap_used_bytes or 0) - (previous.swap_used_bytes or 0)
    growth = current.usage_bytes - previous.usage_bytes + swap_growth - balloon_delta_bytes
    if growth < cfg.growth_min_bytes or growth / interval_s < cfg.growth_bytes_per_s:
        return None
    file_bytes = (current.active_file_bytes or 0) + (current.inactive_file_bytes or 0)
    room = (current.limit_bytes - current.usage_bytes + int(file_bytes * cfg.file_reclaimable_ratio)
            - margin_bytes(current, cfg))
    rate = growth / interval_s
    if room >= max(growth, int(rate * cfg.growth_horizon_s)):
        return None  # the room takes this much again, and the next check's worth at this rate
    # Give back what is missing now and what the demand will take over the next
    # `growth_lookahead_s`: a quarter of the balloon per check trailed a workload writing
    # 250 MiB/s by 3 checks, with the kernel swapping it meanwhile (issue 18's relief bench).
    return (f"guest demand growing {rate / (1 << 20):.0f} MiB/s into its limit "
            f"({max(0, room) >> 20} MiB of room left)", growth - room + int(rate * cfg.growth_lookahead_s))


def pressure_release_pages(balloon_pages: int, givable: int, cfg: PacingConfig) -> int:
    """A large step: a fixed share of the balloon, or the shortfall if that is larger."""
    shortfall_pages = -(-max(0, -givable) // PAGE_SIZE_BYTES)
    step = max(int(balloon_pages * cfg.pressure_deflate_ratio), shortfall_pages, cfg.batch_pages)
    return min(balloon_pages, step)


def next_rate(rate_batches: int, succeeded: bool, cfg: PacingConfig) -> int:
    """Halve on failure (never below one batch), double on success (up to the maximum)."""
    if succeeded:
        return min(cfg.max_rate_batches, rate_batches * 2)
    return max(1, rate_batches // 2)


@dataclass(frozen=True, slots=True)
class PressureBackoff:
    """What the agent remembers of recent pressure, AIMD-style. Re-inflating straight back to
    where the workload thrashed repeats the thrashing, and the second time memcg reclaim may
    not keep up (an OOM kill seen in CI). So a pressure episode leaves a ceiling (the balloon
    right after the deflate) and a pause; after the pause the ceiling creeps up. Pressure again
    after the pause starts the next episode in a row: the pause doubles and the creep halves.
    Pressure during the pause belongs to the same episode (the workload is still paging back in)."""

    episodes_in_row: int = 0
    ceiling_pages: int | None = None
    last_event_ms: int = 0
    paused_until_ms: int = 0


def after_pressure(backoff: PressureBackoff, balloon_after_pages: int, now_ms: int,
                   cfg: PacingConfig) -> PressureBackoff:
    """The memory after a pressure deflate that left `balloon_after_pages` held."""
    if backoff.episodes_in_row and now_ms < backoff.paused_until_ms:  # the same episode
        ceiling = min(balloon_after_pages, backoff.ceiling_pages or balloon_after_pages)
        return PressureBackoff(backoff.episodes_in_row, ceiling, now_ms, backoff.paused_until_ms)
    forgotten = now_ms - backoff.last_event_ms >= cfg.pressure_forget_ms or backoff.ceiling_pages is None
    episodes = 1 if forgotten else backoff.episodes_in_row + 1
    pause_ms = min(cfg.max_pressure_pause_ms, cfg.pressure_pause_ms << min(episodes - 1, 16))
    return PressureBackoff(episodes, balloon_after_pages, now_ms, now_ms + pause_ms)


def soft_pressure_counts(backoff: PressureBackoff, now_ms: int, cfg: PacingConfig) -> bool:
    """Right after a pressure deflate the workload is still paging its memory back in: its
    refaults and limit hits say nothing new for `pressure_cooldown_ms` (OOM events and a
    real shortfall always count)."""
    return now_ms - backoff.last_event_ms >= cfg.pressure_cooldown_ms or not backoff.episodes_in_row


def inflate_ceiling_pages(backoff: PressureBackoff, now_ms: int, cfg: PacingConfig) -> int | None:
    """The most the balloon may hold now because of past pressure, or None (no limit).

    After the pause the ceiling creeps up at `ceiling_relax_bytes_per_s` (halved per episode in
    a row), and the creep doubles every `ceiling_doubling_ms` without pressure: gentle where
    the thrash was, but a workload that went idle is not held back for long (TCP's slow start)."""
    if backoff.ceiling_pages is None or now_ms - backoff.last_event_ms >= cfg.pressure_forget_ms:
        return None
    quiet_ms = max(0, now_ms - backoff.paused_until_ms)
    first_rate_bytes_per_ms = (cfg.ceiling_relax_bytes_per_s >> min(backoff.episodes_in_row - 1, 16)) / 1000
    doublings = quiet_ms / cfg.ceiling_doubling_ms
    if doublings > 40:
        return None  # far beyond any guest's size
    # ∫ r0·2^(t/T) dt from 0 to quiet = r0·T/ln 2 · (2^(quiet/T) − 1)
    grown_bytes = first_rate_bytes_per_ms * cfg.ceiling_doubling_ms / math.log(2) * (2 ** doublings - 1)
    return backoff.ceiling_pages + int(grown_bytes) // PAGE_SIZE_BYTES


def working_set_cap_pages(limit_bytes: int | None, memsz_bytes: int, touched_ratio: float | None,
                          cfg: PacingConfig) -> int | None:
    """The most the balloon may hold without pinning the workload's working set: the limit less
    the memory touched in the last sampling period (accessed bits) and the safety margin.

    The host's policy may ask for more when the working sets together exceed host memory; a
    balloon that took it would only move hot pages to swap and back — thrashing, and in a
    memcg the OOM killer once reclaim cannot keep up (seen in the lab: 184 MiB pinned beside a
    322 MiB hot workload in 512 MiB). The rest is refused and left to the host (vSwap)."""
    if limit_bytes is None or touched_ratio is None:
        return None
    working_set_bytes = int(touched_ratio * memsz_bytes)
    return max(0, limit_bytes - working_set_bytes - _margin_for_limit(limit_bytes, cfg)) // PAGE_SIZE_BYTES


def plan(*, balloon_pages: int, target_pages: int, givable: int, rate_batches: int, now_ms: int,
         inflate_paused_until_ms: int, cfg: PacingConfig, ceiling_pages: int | None = None,
         working_set_cap: int | None = None) -> Plan:
    """The next step toward the target. Deflation is never rate-limited (the guest wants its
    memory back); inflation is limited by the rate, by what the guest can give, by the
    ceiling that past pressure left (`inflate_ceiling_pages`) and by the workload's working
    set (`working_set_cap_pages`)."""
    if target_pages < balloon_pages:
        return Plan("deflate", balloon_pages - target_pages, "above target")
    if target_pages == balloon_pages:
        return Plan("hold", 0, "at target")
    if now_ms < inflate_paused_until_ms:
        return Plan("hold", 0, f"inflation paused for {inflate_paused_until_ms - now_ms} ms after pressure")
    if ceiling_pages is not None and balloon_pages >= ceiling_pages:
        return Plan("refuse", 0, f"held at {ceiling_pages} pages since the guest's workload pressed back")
    if working_set_cap is not None and balloon_pages >= working_set_cap:
        return Plan("refuse", 0, f"held at {working_set_cap} pages: the rest is the workload's working set")
    givable_pages = givable // PAGE_SIZE_BYTES
    if givable_pages < 1:
        return Plan("refuse", 0, f"guest has nothing left to give ({givable >> 20} MiB headroom)", transient=True)
    wanted = min(target_pages - balloon_pages, rate_batches * cfg.batch_pages)
    for cap in (ceiling_pages, working_set_cap):
        if cap is not None:
            wanted = min(wanted, cap - balloon_pages)
    if givable_pages < wanted:
        return Plan("inflate", givable_pages, f"limited by guest headroom ({givable_pages} pages)")
    return Plan("inflate", wanted, "below target")

__all__ = [  # the decisions here and the host terms (guestagent.host_terms)
    "MAX_TARGET_SEQ_JUMP",
    "MIN_HOST_TIMEOUT_MS",
    "MIN_REPORT_INTERVAL_MS",
    "MIN_SAMPLE_PERIOD_MS",
    "TARGET_SEQ_JUMP_PER_S",
    "WORKLOAD_REPORT_FIELDS",
    "Action",
    "HostTimings",
    "PacingConfig",
    "Plan",
    "PressureBackoff",
    "TargetSeqVerdict",
    "after_pressure",
    "classify_target_seq",
    "detect_pressure",
    "floor_sample_period",
    "givable_bytes",
    "inflate_ceiling_pages",
    "margin_bytes",
    "next_rate",
    "plan",
    "pressure_release_pages",
    "soft_pressure_counts",
    "subtract_pages",
    "welcome_timings",
    "working_set_cap_pages",
    "workload_growth",
    "workload_stats",
]
