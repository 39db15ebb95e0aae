"""The status document (`balloonctl status --json`, /status.json, the dashboard) built from the
registry, the ledger and the live settings; its shape is hostd/status_doc.py's. Pure: the
time is passed in."""

from __future__ import annotations

import math

from hostd.context import CoreContext
from hostd.registry import VmRecord
from hostd.status_doc import DepartedVm, StatusDocument, VmStatus
from protocol import PAGE_SIZE_BYTES

PAGE = PAGE_SIZE_BYTES


def int_stat(value: int | float | None) -> int | None:
    """A count or size stat as an integer (None stays unknown)."""
    return None if value is None else int(value)


def _optional_bytes(pages: int | None) -> int | None:
    return None if pages is None else pages * PAGE


def cached_vm_status(ctx: CoreContext, vm: VmRecord, now_ms: int) -> VmStatus:
    """`vm_status`, from the vm's cached entry while nothing it shows has changed (CoreContext
    drops it: the vm's own frames, or any change of everything). Its cost grows with the vm
    table, and one-shot identities (review S11) kept ~600 vms in it whose entries never change."""
    cached = ctx.vm_status_cache.get(vm.vm_id)
    if cached is not None and cached[0] is vm and cached[1] == ctx.status_generation:
        entry = cached[2].copy()
        entry["last_seen_ms_ago"] = now_ms - vm.last_seen_ms
        return entry
    entry = vm_status(ctx, vm, now_ms)
    ctx.vm_status_cache[vm.vm_id] = (vm, ctx.status_generation, entry)
    return entry.copy()


def vm_status(ctx: CoreContext, vm: VmRecord, now_ms: int) -> VmStatus:
    registry = ctx.registry
    stats = vm.stats()
    ws = vm.working_set
    status = vm.status
    host = vm.host
    targets = vm.targets
    outcome = registry.outcome(vm)
    traffic = vm.traffic
    return {
        "vm_id": vm.vm_id,
        "alive": vm.alive,
        "agent_state": status.agent_state if status else ("joined" if vm.has_agent else "no_agent"),
        "page_kind": vm.identity.page_kind,
        "cgroup_version": vm.identity.cgroup_version,
        "last_seen_ms_ago": now_ms - vm.last_seen_ms,
        "memsz_bytes": vm.memsz_pages * PAGE,
        "claimed_memsz_bytes": vm.identity.claimed_memsz_bytes,
        "consumed_bytes": vm.consumed_pages * PAGE,
        "granted_bytes": vm.granted_pages * PAGE,
        "alloc_target_bytes": outcome.alloc_target_pages * PAGE,
        "active_bytes": outcome.active_pages * PAGE,
        "touched_ratio": status.ws_touched_ratio if status else None,
        "active_ratio": ws.ratio,
        "active_slow_ratio": ws.slow,
        "active_fast_ratio": ws.fast,
        "active_fast_current_ratio": ws.fast_current,
        "ws_method": status.ws_method if status else None,
        "balloon_bytes": vm.balloon_pages * PAGE,
        "ledger_bytes": ctx.ledger.held_pages(vm.vm_id) * PAGE,
        "balloon_target_bytes": targets.balloon_target_pages * PAGE,
        "balloon_max_bytes": targets.balloon_max_pages * PAGE,
        "manual_balloon_target_bytes": _optional_bytes(targets.manual_balloon_pages),
        "swap_current_bytes": int_stat(stats.get("swap_used_bytes"))
        if vm.has_agent or host.cgroup_swap_pages is None else host.cgroup_swap_pages * PAGE,
        "has_agent": vm.has_agent,
        "host_target": registry.host_targets.get(vm.vm_id),
        "cgroup_limit_bytes": _optional_bytes(host.cgroup_limit_pages),
        "vswap_limit_bytes": _optional_bytes(host.vswap_limit_pages),
        "vswap_reason": host.vswap_reason,
        "frozen": host.frozen_since_ms is not None,
        "backend_error": host.backend_error,
        "swap_target_bytes": outcome.swap_target_pages * PAGE,
        "swap_in_pages": int_stat(stats.get("swap_in_pages")),
        "swap_out_pages": int_stat(stats.get("swap_out_pages")),
        "major_faults": int_stat(stats.get("major_faults")),
        "shares": vm.shares(),
        "shares_setting": vm.params.shares,
        "reservation_bytes": vm.params.reservation_bytes,
        "limit_bytes": vm.params.limit_bytes,
        "maxmemctl_bytes": vm.params.maxmemctl_bytes,
        "rho": outcome.rho if math.isfinite(outcome.rho) else None,  # infinite when allocated nothing
        "reason": registry.reason(vm),
        "refused_pages": traffic.lock_refused_pages,
        "inflated_pages": traffic.locked_pages,
        "deflated_pages": traffic.unlocked_pages,
        "lock_batches": traffic.lock_batches,
        "unlock_batches": traffic.unlock_batches,
        "resets": vm.resets,
        "workload": {k.removeprefix("workload_"): v for k, v in stats.items() if k.startswith("workload_")},
    }


def build(ctx: CoreContext, now_ms: int) -> StatusDocument:
    limits = ctx.thresholds()
    settings = ctx.settings
    registry = ctx.registry
    vms: list[VmStatus] = []
    departed: list[DepartedVm] = []
    for vm in sorted(registry.vms.values(), key=lambda v: v.vm_id):
        if vm.alive:
            vms.append(cached_vm_status(ctx, vm, now_ms))
        else:  # listed apart until dead_vm_ttl_ms forgets them
            departed.append({"vm_id": vm.vm_id, "reason": vm.left_reason,
                             "left_ms_ago": None if vm.left_ms is None else now_ms - vm.left_ms})
    return {
        "host": {
            "session_id": ctx.session_id,
            "uptime_ms": now_ms - ctx.started_ms,
            "state": ctx.state,
            "free_bytes": ctx.free_pages() * PAGE,
            "granted_bytes": registry.granted_pages * PAGE,
            "thresholds_bytes": {"high": limits.high * PAGE, "soft": limits.soft * PAGE,
                                 "hard": limits.hard * PAGE, "low": limits.low * PAGE},
            "host_memory_bytes": settings.host_memory_pages * PAGE,
            "idle_tax_ratio": settings.idle_tax_ratio,
            "ctl_max_percent": settings.ctl_max_percent,
            "sample_period_ms": settings.sample_period_ms,
            "balance_period_ms": settings.balance_period_ms,
            "sliding_min_free": settings.sliding_min_free,
            "report_interval_ms": ctx.config.report_interval_ms,
            "vms_alive": registry.alive_count,
            "protocol_errors": dict(ctx.protocol_errors),
            "counters": dict(ctx.counters),
        },
        "vms": vms,
        "departed": departed,
    }
