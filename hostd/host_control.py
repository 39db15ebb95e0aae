"""Host-level reclamation (cgroups; the decisions are hostd/vswap.py's): vms known by their
cgroup, the server's cgroup readings, the limit/freeze/thaw/pageout actions as data, and their
rollback when the backend could not apply them. No I/O here: the server's backend acts."""

from __future__ import annotations

import logging

from hostd import policy, vswap
from hostd.config import VmParams
from hostd.context import CoreContext
from hostd.host_actions import HostAction
from hostd.registry import Identity, Targets, VmRecord
from protocol import PAGE_SIZE_BYTES
from protocol.limits import MAX_MEMSZ_BYTES

log = logging.getLogger("hostd.core")

class HostControlPlane:
    def __init__(self, ctx: CoreContext) -> None:
        self.ctx = ctx
        self.registry = ctx.registry

    def observe_cgroup(self, vm_id: str, usage_bytes: int, swap_bytes: int | None, own_limit_bytes: int | None,
                       now_ms: int) -> None:
        """The server's reading of a configured vm's cgroup (once a second). A vm with no
        agent becomes known this way; `own_limit_bytes` is the cgroup's limit before hostd
        changed it (its memsz when it has no agent)."""
        ctx, registry = self.ctx, self.registry
        ctx.snapshot_cache = None
        paged = None if own_limit_bytes is None else own_limit_bytes // PAGE_SIZE_BYTES * PAGE_SIZE_BYTES
        if paged is not None and not PAGE_SIZE_BYTES <= paged <= MAX_MEMSZ_BYTES:  # S24: a Hello would refuse it
            ctx.counters["cgroup_limit_out_of_range"] += 1
            own_limit_bytes = None  # no limit: not scheduled, or the last good one kept
        vm = registry.vms.get(vm_id)
        if vm is None or not vm.alive:
            if own_limit_bytes is None:
                ctx.counters["cgroup_without_limit"] += 1
                return  # no memsz to schedule against; the event was logged by the server
            memsz_bytes = own_limit_bytes // PAGE_SIZE_BYTES * PAGE_SIZE_BYTES
            params = vm.params if vm is not None else ctx.config.vms.get(vm_id, VmParams())
            record = VmRecord(vm_id=vm_id, identity=Identity(claimed_memsz_bytes=memsz_bytes, registered_ms=now_ms),
                              params=params, last_seen_ms=now_ms, targets=Targets(reason="cgroup only (no agent)"))
            if vm is not None:
                record.host = vm.host
            record.targets.balloon_max_pages = policy.balloon_max_pages(
                record.memsz_pages, ctx.settings.ctl_max_percent, record.maxmemctl_pages)
            registry.put(record)
            vm = record
            target = registry.host_targets.get(vm_id)
            ctx.event(now_ms, "join", vm=vm_id, memsz_bytes=memsz_bytes, agent=False, host_target=target)
            log.info("vm %s joined without an agent: %s, memsz %d MiB", vm_id, target, memsz_bytes >> 20)
            ctx.request_recompute(f"{vm_id} joined (cgroup only)")
        host = vm.host
        if own_limit_bytes is not None:
            host.cgroup_limit_pages = own_limit_bytes // PAGE_SIZE_BYTES
        host.cgroup_usage_pages = usage_bytes // PAGE_SIZE_BYTES
        host.cgroup_swap_pages = None if swap_bytes is None else swap_bytes // PAGE_SIZE_BYTES
        host.cgroup_read_ms = now_ms
        vm.memsz_cap_pages = ctx.memsz_cap(vm)
        if not vm.has_agent:
            vm.last_seen_ms = now_ms
        # hostd's own reading of the cgroup, not the agent's report, is what the vm holds.
        registry.set_usage(vm, consumed_pages=min(host.cgroup_usage_pages, vm.memsz_pages))
        ctx.update_state(now_ms)

    def set_host_target(self, vm_id: str, target: str) -> None:
        """A target found at run time (a container labelled for the vm)."""
        self.registry.host_targets[vm_id] = target
        self.ctx.vm_changed(vm_id)  # its status entry shows the target

    def cgroup_gone(self, vm_id: str, now_ms: int, reason: str) -> None:
        vm = self.registry.vms.get(vm_id)
        if vm is not None and vm.alive and not vm.has_agent:
            self.registry.leave(vm, now_ms, f"cgroup gone: {reason}")
            self.ctx.event(now_ms, "left", vm=vm_id, reason=reason)

    def host_actions(self, now_ms: int) -> list[HostAction]:
        """What the backend should do now: (vm, cgroup, "limit" | "freeze" | "thaw" | "pageout",
        limit bytes or None = the cgroup's own limit; "pageout": bytes hostd pages out itself,
        vswap_mode blind). The vm records assume success; the server reports failures with
        `host_action_failed`."""
        actions: list[HostAction] = []
        config = self.ctx.config
        if not config.vswap:
            return actions
        step = max(1, config.vswap_step_bytes // PAGE_SIZE_BYTES)
        # What lowered limits may give back this step, shared by all vms (vswap.LimitInput).
        spare = [max(0, self.ctx.free_pages() - self.ctx.thresholds().high)]
        for vm in self.registry.vms.values():
            target = self.registry.host_targets.get(vm.vm_id)
            if target is None or vm.host.cgroup_limit_pages is None or not vm.alive:
                continue
            self._limit_actions(vm, target, step, now_ms, actions, spare)
            self._block_actions(vm, target, now_ms, actions)
        return actions

    def _limit_actions(self, vm: VmRecord, target: str, step: int, now_ms: int, actions: list[HostAction],
                       spare: list[int]) -> None:
        ctx, host = self.ctx, vm.host
        assert host.cgroup_limit_pages is not None
        link = vm.agent
        agent_usable = link is not None and not link.refusing
        outcome = self.registry.outcome(vm)
        swap_target = outcome.swap_target_pages
        # Reclaim mode: the balloon's memory is the host's (the agent let it go once the
        # ledger had it), so the guest's ceiling is its own limit less the balloon, at once.
        returned = ctx.ledger.held_pages(vm.vm_id) if link is not None and link.reclaim else 0
        reclaim = link is not None and link.reclaim
        # Never below what vswap would leave the guest (reservation + 16 MiB), whatever ledger
        # an agent built: its lock frames are hints too.
        floor = vm.reservation_pages + vswap.FLOOR_MARGIN_PAGES
        ceiling = max(host.cgroup_limit_pages - returned, min(floor, host.cgroup_limit_pages))
        # The allocation in the limit's units, as the swap goal is (ceiling − SWTGT): the cgroup
        # also holds the balloon's pinned pages, which the allocation target does not count.
        balloon = 0 if reclaim else vm.balloon_pages
        grant = ceiling - max(0, vm.memsz_pages - outcome.alloc_target_pages - balloon)
        limit_in = vswap.LimitInput(
            memsz_pages=ceiling, applied_limit_pages=host.vswap_limit_pages,
            usage_pages=host.cgroup_usage_pages, balloon_pages=balloon,
            reservation_pages=vm.reservation_pages,
            swap_target_pages=swap_target, swap_due=vswap.swap_due(ctx.state, agent_usable),
            spare_pages=None if reclaim else spare[0], grant_pages=grant)
        decision = vswap.next_limit(limit_in, step)
        if not limit_in.swap_due and not reclaim and host.vswap_limit_pages is not None:
            # What it got back above its own grant came out of the memory shared this step.
            new = ceiling if decision.limit_pages is None else decision.limit_pages
            spare[0] = max(0, spare[0] - max(0, new - max(host.vswap_limit_pages, grant)))
        if returned and decision.limit_pages is None:
            applied = host.vswap_limit_pages if host.vswap_limit_pages is not None else host.cgroup_limit_pages
            stepped = max(ceiling, applied - step)  # down by at most a step a second, as vswap does
            decision = vswap.LimitDecision(stepped, f"reclaim: balloon of {returned} pages returned to the host")
        if decision.limit_pages == host.vswap_limit_pages:
            return
        old = host.vswap_previous_limit_pages = host.vswap_limit_pages
        host.vswap_limit_pages, host.vswap_reason = decision.limit_pages, decision.reason
        limit_bytes = None if decision.limit_pages is None else decision.limit_pages * PAGE_SIZE_BYTES
        if ctx.config.vswap_mode == "blind" and decision.limit_pages is not None \
                and host.cgroup_usage_pages > decision.limit_pages:  # hostd picks the pages, then holds the limit
            actions.append(HostAction(vm.vm_id, target, "pageout",
                                      (host.cgroup_usage_pages - decision.limit_pages) * PAGE_SIZE_BYTES))
        actions.append(HostAction(vm.vm_id, target, "limit", limit_bytes))
        ctx.counters["vswap_limit_changes"] += 1
        ctx.event(now_ms, "vswap", vm=vm.vm_id, old_limit_pages=old, new_limit_pages=decision.limit_pages,
                  swap_target_pages=swap_target, usage_pages=host.cgroup_usage_pages, reason=decision.reason)

    def _block_actions(self, vm: VmRecord, target: str, now_ms: int, actions: list[HostAction]) -> None:
        ctx, host = self.ctx, vm.host
        outcome = self.registry.outcome(vm)
        block_max_ms = ctx.config.block_max_ms
        granted_now = max(0, host.cgroup_usage_pages - vm.balloon_pages)
        # Only guests the host is paging out are frozen: one whose balloon can still cover
        # its gap keeps running, as freezing it would stop its balloon driver too.
        above = granted_now > outcome.alloc_target_pages and outcome.swap_target_pages > 0
        block_in = vswap.BlockInput(state=ctx.state, above_target=above, frozen_since_ms=host.frozen_since_ms,
                                    cooldown_until_ms=host.block_cooldown_until_ms)
        frozen, why = vswap.block_decision(block_in, now_ms, block_max_ms) if block_max_ms else (False, "blocking off")
        if frozen and host.frozen_since_ms is None:
            host.frozen_since_ms = now_ms
            actions.append(HostAction(vm.vm_id, target, "freeze", None))
            ctx.counters["blocks"] += 1
            ctx.event(now_ms, "block", vm=vm.vm_id, reason=why)
        elif not frozen and host.frozen_since_ms is not None:
            if now_ms - host.frozen_since_ms >= block_max_ms:
                host.block_cooldown_until_ms = now_ms + block_max_ms
            host.frozen_since_ms = None
            vm.last_seen_ms = max(vm.last_seen_ms, now_ms)  # its agent gets a full report window again
            actions.append(HostAction(vm.vm_id, target, "thaw", None))
            ctx.event(now_ms, "unblock", vm=vm.vm_id, reason=why)

    def host_actions_succeeded(self, vm_ids: set[str]) -> None:
        for vm_id in vm_ids:
            vm = self.registry.vms.get(vm_id)
            if vm is not None:
                vm.host.backend_error = None

    def host_action_failed(self, vm_id: str, action: str, detail: str, now_ms: int) -> None:
        vm = self.registry.vms.get(vm_id)
        self.ctx.counters["host_action_failures"] += 1
        error = f"{action}: {detail}"
        if vm is None or vm.host.backend_error != error:  # an event per new failure, not per retry
            self.ctx.event(now_ms, "host_action_failed", vm=vm_id, action=action, detail=detail)
        if vm is not None:
            vm.host.backend_error = error
            if action == "freeze":
                vm.host.frozen_since_ms = None
            elif action == "limit":
                vm.host.vswap_limit_pages = vm.host.vswap_previous_limit_pages
