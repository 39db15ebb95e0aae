"""hostd's state machine without I/O: frames and the clock go in, frames and events come out.

    core.handle_agent(identity, frame, now_ms, user_id)    -> [(identity, frame), ...] to send
    core.handle_control(frame, now_ms, operator)           -> (reply frame, [(identity, frame), ...])
    core.tick(now_ms)                                      -> [(identity, frame), ...] (liveness, balance period)
    core.observe_cgroup(...), core.cgroup_gone(...), core.set_host_target(...)   the server's cgroup readings
    core.host_actions(now_ms)                              -> limit/freeze/thaw/pageout actions for the backend
    core.host_actions_succeeded(...), core.host_action_failed(...)               what the backend did
    core.set_agent_keys(...), core.restore_settings(...), core.settings_document()
    core.drain_events()                                    -> [event dict, ...] for the JSON Lines log
    core.snapshot(now_ms)                                  -> the `balloonctl status --json` document

`hostd.server` owns the sockets and the clock and calls these; tests call them directly. No
peer input can raise out of here: every failure becomes an `error` reply and a counter.

HostCore is a facade over one module per job: the vm table and the one writer of usage,
Σgranted and the free-memory state (hostd/registry.py), the agent plane (agent_plane.py), the
control plane (control_plane.py), host-level reclamation (host_control.py) and the status
document (snapshot.py). The policy adapter (records → policy inputs → targets) is here.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

from hostd import policy
from hostd import snapshot as status_snapshot
from hostd.agent_plane import AgentPlane
from hostd.config import HostConfig
from hostd.context import CoreContext, HostSettings, Outgoing
from hostd.control_plane import ControlPlane
from hostd.host_actions import HostAction
from hostd.host_control import HostControlPlane
from hostd.ledger import Ledger
from hostd.registry import Registry, VmRecord
from hostd.status_doc import StatusDocument
from protocol import ControlOk, ErrorCode, GetStatus, ProtocolError, SetTarget, StatusReply
from protocol.limits import MAX_CONTROL_FRAME_BYTES

__all__ = ["HostCore", "HostSettings", "Outgoing", "VmRecord"]

log = logging.getLogger(__name__)

LOGGED_TARGETS_PER_RECOMPUTE = 10  # more target changes than this in one recompute: summed up in one line
SNAPSHOT_REUSE_MS = 250  # status requests within this share one document (any change rebuilds it)
# With this many live vms or more, joins and departures recompute at most every
# MEMBERSHIP_RECOMPUTE_MS: a flood of one-shot identities (review S11: 200 joins/s, ~600 live)
# recomputed for all of them at every 100 ms tick (~10 ms each at 600 vms). Below it a recompute
# is cheap and a new vm has its first target at the next tick. State changes, settings, the
# balance period and adoption are never held back.
COALESCE_FROM_VMS = 100
MEMBERSHIP_RECOMPUTE_MS = 500


def recompute_due(pending: bool, urgent: bool, alive_vms: int, now_ms: int, last_recompute_ms: float) -> bool:
    """Whether the tick recomputes now: something asked for it, and either it cannot wait
    (`urgent`), or the table is small, or the last recompute is MEMBERSHIP_RECOMPUTE_MS old."""
    if not pending:
        return False
    return urgent or alive_vms < COALESCE_FROM_VMS or now_ms - last_recompute_ms >= MEMBERSHIP_RECOMPUTE_MS


def silent_limit_ms(base_ms: int, reported: bool, reading_behind_ms: int) -> int:
    """How long a vm's agent may be silent before it is lost: `base_ms` (lost_after_reports
    reports), and, for an agent that has reported (or says it re-registers within this
    session), also the time hostd itself has been behind reading the agent socket, up to
    another `base_ms`: its frames may be waiting there, behind a flood of other connections'
    (ZeroMQ serves connections in turn). A vm that never reported gets no grace: one-shot
    identities (review S11) must not stay twice as long."""
    return base_ms + (min(max(0, reading_behind_ms), base_ms) if reported else 0)


def trusted_status_reply(document: StatusDocument) -> StatusReply:
    """A status_reply around hostd's own document (status_doc.py's typed shape, non-finite
    figures already null) without validating it again: the receiver's decode does
    (check_plain_data), and here it cost ~34 ms of each ~73 ms status at 600 vms. encode()
    still enforces the frame limit."""
    reply = object.__new__(StatusReply)
    object.__setattr__(reply, "snapshot", document)
    return reply


class HostCore:
    def __init__(self, config: HostConfig, session_id: str, now_ms: int, control_token: str | None = None,
                 persisted: Mapping[str, Any] | None = None, max_pfn: int | None = None) -> None:
        """`max_pfn`: one past the host's highest page frame (PFN ranges beyond are INVALID)."""
        self.config = config
        self.session_id = session_id
        self.started_ms = now_ms
        self._ctx = ctx = CoreContext(config, session_id, now_ms, max_pfn)
        self.agents = AgentPlane(ctx, now_ms)
        self.control = ControlPlane(ctx, control_token)
        self.host_control = HostControlPlane(ctx)
        self.registry: Registry = ctx.registry
        self.ledger: Ledger = ctx.ledger
        self.protocol_errors: Counter[str] = ctx.protocol_errors
        self.counters: Counter[str] = ctx.counters
        self.next_balance_ms = now_ms + ctx.settings.balance_period_ms
        self.last_recompute_ms: float = -math.inf  # never
        self._target_seq = 0
        self._settled = False
        self._no_loss_until_ms: float = -math.inf  # no agent can be lost before this (_scan_for_lost)

    # ---- shared state, as the server and the tests read it -------------------------------------
    @property
    def vms(self) -> dict[str, VmRecord]:
        return self.registry.vms

    @property
    def state(self) -> policy.State:
        return self.registry.state

    @property
    def settings(self) -> HostSettings:
        return self._ctx.settings

    @property
    def agent_vm_ids(self) -> dict[str, frozenset[str]] | None:
        return self.agents.agent_vm_ids

    @agent_vm_ids.setter
    def agent_vm_ids(self, value: dict[str, frozenset[str]] | None) -> None:
        self.agents.agent_vm_ids = value

    @property
    def control_token(self) -> str | None:
        return self.control.control_token

    @property
    def settings_dirty(self) -> bool:
        return self.control.settings_dirty

    @settings_dirty.setter
    def settings_dirty(self, value: bool) -> None:
        self.control.settings_dirty = value

    @property
    def settle_until_ms(self) -> int:
        return self.agents.settle_until_ms

    def thresholds(self) -> policy.Thresholds:
        return self._ctx.thresholds()

    def free_pages(self) -> int:
        return self._ctx.free_pages()

    def drain_events(self) -> list[dict[str, Any]]:
        events, self._ctx.events = self._ctx.events, []
        return events

    # ---- agent plane ----------------------------------------------------------------------------
    def handle_agent(self, identity: bytes, frame: bytes, now_ms: int, user_id: str | None = None) -> Outgoing:
        """`user_id`: the ZAP User-Id of the connection (the allowlisted key's name) under CURVE."""
        return self.agents.handle(identity, frame, now_ms, user_id)

    def route_gone(self, route: bytes, now_ms: int) -> None:
        """The server could not send to this agent connection (it is closed)."""
        try:
            self.agents.route_gone(route, now_ms)
        except Exception:  # a bug: logged and counted, never the end of the daemon
            self.protocol_errors["INTERNAL"] += 1
            log.exception("internal error on a closed agent connection")

    def set_agent_keys(self, vm_ids_by_key: dict[str, frozenset[str]], now_ms: int) -> None:
        """CURVE's allowlist as it is now: vms whose key no longer binds them are dropped."""
        self.agents.set_agent_keys(vm_ids_by_key, now_ms)

    # ---- host-level reclamation -----------------------------------------------------------------
    def observe_cgroup(self, vm_id: str, usage_bytes: int, swap_bytes: int | None, own_limit_bytes: int | None,
                       now_ms: int) -> None:
        self.host_control.observe_cgroup(vm_id, usage_bytes, swap_bytes, own_limit_bytes, now_ms)

    def set_host_target(self, vm_id: str, target: str) -> None:
        self.host_control.set_host_target(vm_id, target)

    def cgroup_gone(self, vm_id: str, now_ms: int, reason: str) -> None:
        self.host_control.cgroup_gone(vm_id, now_ms, reason)

    def host_actions(self, now_ms: int) -> list[HostAction]:
        return self.host_control.host_actions(now_ms)

    def host_actions_succeeded(self, vm_ids: set[str]) -> None:
        self.host_control.host_actions_succeeded(vm_ids)

    def host_action_failed(self, vm_id: str, action: str, detail: str, now_ms: int) -> None:
        self.host_control.host_action_failed(vm_id, action, detail, now_ms)

    # ---- control plane --------------------------------------------------------------------------
    def handle_control(self, frame: bytes, now_ms: int, operator: bool = False) -> tuple[bytes, Outgoing]:
        """The reply to balloonctl, and any frames to agents that the change caused.
        `operator`: the connection itself is an authority (a CURVE operator key, or an
        ipc:// socket whose file mode let only the owner in); else a change needs the token."""
        ctx = self._ctx
        seq: int | None = None
        try:
            message, seq = self.control.decode(frame)
            if isinstance(message, GetStatus):
                return ctx.frame(trusted_status_reply(self.cached_snapshot(now_ms)), seq, MAX_CONTROL_FRAME_BYTES), []
            detail, data, trigger, out = self.control.change(message, now_ms, operator)
            out += self.recompute(now_ms, trigger)
            return ctx.frame(ControlOk(detail=detail, data=data), seq), out
        except ProtocolError as exc:
            ctx.protocol_errors[exc.code.name] += 1
            return ctx.error(exc.code, exc.detail, seq), []
        except Exception:  # a bug: logged and answered, never the end of the daemon
            ctx.protocol_errors["INTERNAL"] += 1
            log.exception("internal error on a control request (%d bytes)", len(frame))
            return ctx.error(ErrorCode.INTERNAL, "internal error; see hostd's log", seq), []

    def restore_settings(self, document: Mapping[str, Any], now_ms: int) -> list[str]:
        """Apply what `settings_document()` saved before a restart (skipped entries returned)."""
        return self.control.restore_settings(document, now_ms)

    def settings_document(self) -> dict[str, Any]:
        return self.control.settings_document()

    # ---- status -----------------------------------------------------------------------------------
    def cached_snapshot(self, now_ms: int) -> StatusDocument:
        """The status document for status requests: shared by the requests that arrive between
        two agent frames or ticks (at most SNAPSHOT_REUSE_MS apart). Its cost grows with the vm
        table, and many clients polling at once must not multiply it."""
        cached = self._ctx.snapshot_cache
        if cached is not None and 0 <= now_ms - cached[0] < SNAPSHOT_REUSE_MS:
            return cached[1]
        document = self.snapshot(now_ms)
        self._ctx.snapshot_cache = (now_ms, document)
        return document

    def snapshot(self, now_ms: int) -> StatusDocument:
        return status_snapshot.build(self._ctx, now_ms)

    # ---- policy -----------------------------------------------------------------------------------
    def recompute(self, now_ms: int, trigger: str) -> Outgoing:
        """Records → policy inputs → targets, and a set_target to each agent whose target moved."""
        ctx = self._ctx
        vms = [vm for vm in self.registry.vms.values() if vm.alive]
        if not vms:
            return []
        inputs = [
            policy.VmInput(
                vm_id=vm.vm_id, memsz_pages=vm.memsz_pages, shares=vm.shares(),
                reservation_pages=vm.reservation_pages,
                limit_pages=vm.limit_pages, maxmemctl_pages=vm.maxmemctl_pages,
                active_ratio=vm.working_set.ratio, balloon_pages=vm.balloon_pages, agent_alive=vm.has_agent,
                agent_refusing=vm.agent is not None and vm.agent.refusing,
                manual_balloon_pages=vm.targets.manual_balloon_pages,
                balloon_target_pages=vm.targets.balloon_target_pages,
            )
            for vm in vms
        ]
        settings = ctx.settings
        host = policy.HostInput(settings.host_memory_pages, settings.idle_tax_ratio, settings.ctl_max_percent,
                                settings.sliding_min_free)
        result = policy.compute_targets(host, inputs, self.state)
        self.registry.adopt_result(result, vms)
        ctx.snapshot_cache = None  # every vm's figures and reason are the new result's
        self.last_recompute_ms = now_ms
        self.next_balance_ms = now_ms + settings.balance_period_ms
        out: Outgoing = []
        changed = 0
        for index, vm in enumerate(vms):
            targets = vm.targets
            new_target = int(result.balloon_target_pages[index])
            targets.balloon_max_pages = int(result.balloon_max_pages[index])
            link = vm.agent
            if link is None:  # nobody to balloon: the swap target carries it all
                targets.balloon_target_pages = 0
                continue
            if link.adopted_awaiting_report or (new_target == targets.balloon_target_pages and targets.target_seq):
                continue
            old_target = targets.balloon_target_pages
            self._target_seq += 1
            targets.balloon_target_pages, targets.target_seq = new_target, self._target_seq
            out.append((link.route, ctx.frame(SetTarget(target_pages=new_target, target_seq=targets.target_seq))))
            if new_target != old_target:
                changed += 1
                self._target_changed(vm, result, index, old_target, trigger, now_ms, changed)
        if changed > LOGGED_TARGETS_PER_RECOMPUTE:
            log.info("... and %d more balloon targets changed (%s; every one is in the event log)",
                     changed - LOGGED_TARGETS_PER_RECOMPUTE, trigger)
        return out

    def _target_changed(self, vm: VmRecord, result: policy.PolicyResult, index: int, old_target: int,
                        trigger: str, now_ms: int, changed: int) -> None:
        reason = result.decision(index).reason
        rho = float(result.rho[index])
        new_target = vm.targets.balloon_target_pages
        self._ctx.event(now_ms, "target", vm=vm.vm_id, old_balloon_target_pages=old_target,
                        new_balloon_target_pages=new_target,
                        alloc_target_pages=int(result.alloc_target_pages[index]),
                        swap_target_pages=int(result.swap_target_pages[index]),
                        rho=round(rho, 6) if math.isfinite(rho) else None,
                        active_pages=int(result.active_pages[index]), reason=reason, trigger=trigger)
        # The event log has every change; the text log the first few of a recompute.
        log.log(logging.INFO if changed <= LOGGED_TARGETS_PER_RECOMPUTE else logging.DEBUG,
                "vm %s balloon target %d → %d pages (%s; %s)", vm.vm_id, old_target, new_target, reason, trigger)

    def _scan_for_lost(self, now_ms: int, limits: tuple[int, int]) -> list[VmRecord]:
        """Agents silent past their limit; and, in the same pass, when the next one could be:
        a vm is lost only once now - last_seen exceeds its limit (≥ limits[0], the shortest),
        and last_seen only grows, so until the oldest last_seen kept + limits[0] no scan can
        find one. A vm that registers later is seen later than that oldest one (or than now,
        with none kept), so it cannot be due sooner, and limits[0] (no grace) does not change
        with how far behind hostd reads. The scan of every vm ten times a second was 8 % of
        hostd's samples at 2,000 agents (py-spy); it now runs about once per (limit − report
        interval). A frozen guest's agent is frozen too: its silence is ours, not a lost agent."""
        lost: list[VmRecord] = []
        oldest_seen_ms = now_ms
        for vm in self.registry.vms.values():
            if not vm.alive or vm.agent is None:
                continue
            if vm.host.frozen_since_ms is None and now_ms - vm.last_seen_ms > limits[
                    vm.agent.status is not None or vm.agent.proven]:
                lost.append(vm)
            elif vm.last_seen_ms < oldest_seen_ms:
                oldest_seen_ms = vm.last_seen_ms
        self._no_loss_until_ms = oldest_seen_ms + limits[0]
        return lost

    def _scan_for_expired(self, now_ms: int) -> list[VmRecord]:
        """Departed vms past dead_vm_ttl_ms, and the oldest departure of those kept (the next
        scan is due at its ttl; a later departure lowers it in Registry.leave)."""
        expired: list[VmRecord] = []
        oldest_left_ms: float = math.inf
        ttl_ms = self.config.dead_vm_ttl_ms
        for vm in self.registry.vms.values():
            left_ms = vm.left_ms
            if left_ms is None or vm.alive:
                continue
            if now_ms - left_ms >= ttl_ms:
                expired.append(vm)
            elif left_ms < oldest_left_ms:
                oldest_left_ms = left_ms
        self.registry.oldest_left_ms = oldest_left_ms
        return expired

    def tick(self, now_ms: int, reading_behind_ms: int = 0) -> Outgoing:
        """`reading_behind_ms`: how long the server has had agent frames queued that it could
        not read yet (0: it is keeping up)."""
        ctx, config, registry = self._ctx, self.config, self.registry
        ctx.host_changed()
        out: Outgoing = []
        if not self._settled and now_ms >= self.agents.settle_until_ms:
            self._settled = True
            waiting = [vm.agent for vm in registry.vms.values()
                       if vm.agent is not None and vm.agent.adopted_awaiting_report and vm.agent.status is not None]
            for link in waiting:
                link.adopted_awaiting_report = False
            if waiting:
                ctx.request_recompute("startup settled: adopted balloons handed to the policy")
        base_limit = config.lost_after_reports * config.report_interval_ms
        limits = (silent_limit_ms(base_limit, False, reading_behind_ms), silent_limit_ms(base_limit, True,
                                                                                         reading_behind_ms))
        lost: list[VmRecord] = []
        if now_ms > self._no_loss_until_ms:
            lost = self._scan_for_lost(now_ms, limits)
        for vm in lost:
            self.agents.drop(vm, now_ms, "lost", f"silent for {now_ms - vm.last_seen_ms} ms")
        if lost:
            ctx.request_recompute(f"lost {', '.join(vm.vm_id for vm in lost[:3])}"
                                  + (f" +{len(lost) - 3} more" if len(lost) > 3 else ""), urgent=False)
        expired: list[VmRecord] = []
        if now_ms - registry.oldest_left_ms >= config.dead_vm_ttl_ms:
            expired = self._scan_for_expired(now_ms)
        for vm in expired:
            ctx.forget(vm)
        ctx.update_state(now_ms)
        if now_ms >= self.next_balance_ms:
            ctx.request_recompute("balance period")
        if recompute_due(bool(ctx.pending_triggers), ctx.recompute_urgent, registry.alive_count, now_ms,
                         self.last_recompute_ms):
            triggers = list(ctx.pending_triggers)
            ctx.pending_triggers = {}
            ctx.recompute_urgent = False
            shown = triggers[:3] + ([f"+{len(triggers) - 3} more"] if len(triggers) > 3 else [])
            out += self.recompute(now_ms, "; ".join(shown))
        return out
