"""What a status says, pure: the typed fields the host's policy reads (usage, working-set
samples, the refusal) and the informational stats array, named once at hello by STATS_KEYS."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from guestagent import agent
from guestagent.cgroup import READING_STATS_KEYS, GuestReading
from guestagent.state import AgentState, Counters
from guestagent.wss import Sample
from protocol import PAGE_SIZE_BYTES, Status, stats_values
from protocol.limits import MAX_MEMSZ_BYTES

# The names of every status's informational stats array, declared once at hello. What the host
# acts on travels in typed status fields instead (usage_bytes, ws_samples, ws_current_ratio...).
TYPED_STATUS_FIELDS = frozenset({"usage_bytes"})
STATS_KEYS: tuple[str, ...] = (*(key for key in READING_STATS_KEYS if key not in TYPED_STATUS_FIELDS),
                               "givable_bytes", "balloon_returned_bytes", "pressure_deflates",
                               "expired_requests", "absurd_target_seqs", *agent.WORKLOAD_REPORT_FIELDS.values())


@dataclass(frozen=True, slots=True)
class StatusInputs:
    reading: GuestReading | None  # the last guest reading
    givable_bytes: int | None
    balloon_pages: int  # pinned now
    returned_pages: int  # handed back to the host (reclaim mode)
    counters: Counters
    target_seq: int  # the newest target acted on
    refused_pages: int  # what the guest could not give since that target
    agent_state: AgentState
    memsz_bytes: int
    last: Sample | None  # the last completed working-set period
    current: Sample | None  # the running one so far
    ws_samples: int
    workload: Mapping[str, int | float] | None = None  # the workload's own report, as stats


def build_status(inp: StatusInputs) -> Status:
    stats: dict[str, int | float | None] = dict(inp.reading.as_stats()) if inp.reading else {}
    stats["givable_bytes"] = inp.givable_bytes
    stats["balloon_returned_bytes"] = inp.returned_pages * PAGE_SIZE_BYTES
    stats["pressure_deflates"] = inp.counters.pressure_deflates
    stats["expired_requests"] = inp.counters.expired_requests
    stats["absurd_target_seqs"] = inp.counters.absurd_target_seqs
    if inp.workload:
        stats.update(inp.workload)
    method_source = inp.last or inp.current
    usage = inp.reading.usage_bytes if inp.reading else None
    return Status(
        balloon_pages=inp.balloon_pages, acked_target_seq=inp.target_seq,
        refused_pages=max(0, min(inp.refused_pages, inp.memsz_bytes // PAGE_SIZE_BYTES)),
        agent_state=inp.agent_state,
        usage_bytes=None if usage is None else max(0, min(usage, MAX_MEMSZ_BYTES)),
        ws_touched_ratio=inp.last.ratio if inp.last else None,
        ws_samples=inp.ws_samples,
        ws_current_ratio=inp.current.ratio if inp.current else None,
        ws_method=method_source.method if method_source else "none",
        stats=stats_values(STATS_KEYS, {k: v for k, v in stats.items() if not isinstance(v, bool)}),
    )
