"""The status document (`balloonctl status --json`, `/status.json`, the dashboard's stream): its
shape as TypedDicts, which every consumer annotates, so mypy checks what used to be a runtime
KeyError. Field names are pinned by tests/data/status_fields.json (a golden file: scripts,
dashboards and the README depend on them). Bytes unless a name says otherwise; None = unknown.
"""

from __future__ import annotations

from typing import Literal, TypedDict

State = Literal["high", "soft", "hard", "low"]


class ThresholdsBytes(TypedDict):
    high: int
    soft: int
    hard: int
    low: int


class HostStatus(TypedDict):
    session_id: str
    uptime_ms: int
    state: State
    free_bytes: int
    granted_bytes: int
    thresholds_bytes: ThresholdsBytes
    host_memory_bytes: int
    idle_tax_ratio: float
    ctl_max_percent: int
    sample_period_ms: int
    balance_period_ms: int
    sliding_min_free: bool
    report_interval_ms: int
    vms_alive: int
    protocol_errors: dict[str, int]
    counters: dict[str, int]


class VmStatus(TypedDict):
    vm_id: str
    alive: bool
    agent_state: str
    page_kind: str
    cgroup_version: int
    last_seen_ms_ago: int
    memsz_bytes: int
    claimed_memsz_bytes: int
    consumed_bytes: int
    granted_bytes: int
    alloc_target_bytes: int
    active_bytes: int
    touched_ratio: float | None
    active_ratio: float
    active_slow_ratio: float
    active_fast_ratio: float
    active_fast_current_ratio: float
    ws_method: str | None
    balloon_bytes: int
    ledger_bytes: int
    balloon_target_bytes: int
    balloon_max_bytes: int
    manual_balloon_target_bytes: int | None
    swap_current_bytes: int | None
    has_agent: bool
    host_target: str | None
    cgroup_limit_bytes: int | None
    vswap_limit_bytes: int | None
    vswap_reason: str
    frozen: bool
    backend_error: str | None
    swap_target_bytes: int
    swap_in_pages: int | None
    swap_out_pages: int | None
    major_faults: int | None
    shares: int
    shares_setting: int | str
    reservation_bytes: int
    limit_bytes: int | None
    maxmemctl_bytes: int | None
    rho: float | None
    reason: str
    refused_pages: int
    inflated_pages: int
    deflated_pages: int
    lock_batches: int
    unlock_batches: int
    resets: int
    workload: dict[str, int | float | None]


class DepartedVm(TypedDict):
    vm_id: str
    reason: str
    left_ms_ago: int | None


class StatusDocument(TypedDict):
    host: HostStatus
    vms: list[VmStatus]
    departed: list[DepartedVm]


def field_names() -> dict[str, list[str]]:
    """Each part's field names, in order (what the golden file pins)."""
    return {"host": list(HostStatus.__annotations__), "vm": list(VmStatus.__annotations__),
            "departed": list(DepartedVm.__annotations__), "document": list(StatusDocument.__annotations__)}
