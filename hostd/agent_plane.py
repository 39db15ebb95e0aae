"""The agent plane: hello (admission, adoption, re-registration), lock, unlock, status, bye;
the ledger reset ("pop") and the loss of an agent. Frames in, registry changes and replies out.
No peer input can raise out of `handle`: every failure becomes an `error` reply and a counter.
"""

from __future__ import annotations

import hmac
import logging
import math
import secrets
from collections.abc import Sequence
from typing import cast

from hostd import policy
from hostd.context import CoreContext, Outgoing
from hostd.eventlog import printable
from hostd.registry import AgentLink, Identity, VmRecord
from protocol import (
    PAGE_SIZE_BYTES,
    Bye,
    ErrorCode,
    Heartbeat,
    Hello,
    Lock,
    LockResult,
    Message,
    ProtocolError,
    SetTarget,
    Settings,
    Status,
    Unlock,
    UnlockResult,
    Welcome,
    decode,
)

log = logging.getLogger("hostd.core")

MISMATCH_REPORTS_BEFORE_RESET = 3
MAX_STAT_VALUE = 1 << 53  # no guest figure is larger (bytes of a 1 PiB guest, or counters); beyond: unknown


def checked_stat(value: int | float | None) -> int | float | None:
    """A stat as hostd keeps it: finite, non-negative and bounded, else unknown (None)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= MAX_STAT_VALUE else None
    return value if math.isfinite(value) and 0.0 <= value <= MAX_STAT_VALUE else None


_PLAIN_STAT_TYPES = frozenset({int, float, type(None)})
# Kinds only a host sends (agent-plane kinds an agent must not): a tuple built once, not a
# union built for every frame.
_HOST_KINDS = (Welcome, Settings, SetTarget, LockResult, UnlockResult)


def checked_stats(values: tuple[int | float | None, ...]) -> tuple[int | float | None, ...]:
    """`checked_stat` of each value. When every value is already what hostd keeps (None, or
    a finite number within bounds: an honest agent's whole list), the list is taken as it
    is after a few C-level passes; one value that is not sends the list through
    `checked_stat` one by one. A sum of floats is finite only if every one is (NaN and ±inf
    propagate, and ≤ 2^53 values cannot overflow), so min and max are never asked about a
    NaN. The value-by-value check was half of hostd's time per status at 2,000 agents."""
    kinds = set(map(type, values))
    if kinds <= _PLAIN_STAT_TYPES:
        # Only numbers are left (None filtered out, or none there): typed for min/max/sum.
        present = cast("Sequence[int | float]", [v for v in values if v is not None] if type(None) in kinds
                       else values)
        try:
            if not present or ((float not in kinds or math.isfinite(sum(present)))
                               and min(present) >= 0 and max(present) <= MAX_STAT_VALUE):
                return values
        except OverflowError:  # an int too large for a float beside a float: one by one
            pass
    return tuple(checked_stat(value) for value in values)


class JoinBucket:
    """New vm ids per second: a token bucket (burst = one second's worth)."""

    def __init__(self, per_s: int, now_ms: int) -> None:
        self.per_s = per_s
        self.tokens = float(per_s)
        self.updated_ms = now_ms

    def take(self, now_ms: int) -> bool:
        self.tokens = min(float(self.per_s), self.tokens + (now_ms - self.updated_ms) * self.per_s / 1000)
        self.updated_ms = now_ms
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class AgentPlane:
    def __init__(self, ctx: CoreContext, now_ms: int) -> None:
        self.ctx = ctx
        self.registry = ctx.registry
        # CURVE: key name (ZAP User-Id) → the vm ids it may register; None = no CURVE.
        self.agent_vm_ids: dict[str, frozenset[str]] | None = None
        self._joins = JoinBucket(ctx.config.max_joins_per_s, now_ms)
        # After a (re)start, agents come back one by one; the first alone would look like an
        # undercommitted host and lose its adopted balloon. Adopted balloons are held until
        # every agent has had time to notice the new session (its host timeout + a retry).
        config = ctx.config
        self.settle_until_ms = now_ms + (config.lost_after_reports + 4) * config.report_interval_ms

    def handle(self, identity: bytes, frame: bytes, now_ms: int, user_id: str | None = None) -> Outgoing:
        """`user_id`: the ZAP User-Id of the connection (the allowlisted key's name) under CURVE."""
        ctx = self.ctx
        # What status shows changes with every agent frame: the host's figures, and the entry of
        # the vm this connection speaks for (before the frame, and after a hello bound another).
        ctx.vm_changed(self.registry.routes.get(identity))
        seq: int | None = None
        try:
            envelope = decode(frame)
            message, seq = envelope.message, envelope.seq
            return self._dispatch(identity, seq, message, now_ms, user_id)
        except ProtocolError as exc:
            ctx.protocol_errors[exc.code.name] += 1
            return [(identity, ctx.error(exc.code, exc.detail, seq))]
        except Exception:  # a bug, never the peer's fault to crash us for: log it, answer, go on
            ctx.protocol_errors["INTERNAL"] += 1
            log.exception("internal error on an agent frame (%d bytes)", len(frame))
            return [(identity, ctx.error(ErrorCode.INTERNAL, "internal error; see hostd's log", seq))]

    def _dispatch(self, route: bytes, seq: int, message: Message, now_ms: int, user_id: str | None) -> Outgoing:
        if message.plane != "agent" or isinstance(message, _HOST_KINDS):
            raise ProtocolError(ErrorCode.UNEXPECTED_KIND, f"{message.kind} is not sent by agents")
        if isinstance(message, Hello):
            if self.agent_vm_ids is not None and message.vm_id not in self.agent_vm_ids.get(user_id or "", ()):
                self.ctx.counters["identity_refused"] += 1
                raise ProtocolError(ErrorCode.UNAUTHORIZED, f"key {user_id!r} may not register vm {message.vm_id}")
            return self._on_hello(route, seq, message, now_ms, user_id)
        # A connection speaks for the vm its hello registered, never for the vm it names:
        # routing ids are the ROUTER's, one per connection, and bound at welcome.
        vm = self.registry.by_route(route)
        link = None if vm is None else vm.agent
        if vm is None or link is None or not vm.alive or link.route != route:
            raise ProtocolError(ErrorCode.NOT_REGISTERED, "not registered with this host session: say hello")
        if self.agent_vm_ids is not None and (user_id != link.key_name
                                              or vm.vm_id not in self.agent_vm_ids.get(user_id or "", ())):
            # Checked on every frame, not only at hello: a key removed from the allowlist
            # stops working at once, even on a connection it had already opened.
            self.ctx.counters["identity_refused"] += 1
            raise ProtocolError(ErrorCode.UNAUTHORIZED, f"key {user_id!r} may not speak for vm {vm.vm_id}")
        vm.last_seen_ms = now_ms
        if isinstance(message, Lock):
            return self._on_lock(route, seq, vm, message)
        if isinstance(message, Unlock):
            return self._on_unlock(route, seq, vm, message)
        if isinstance(message, Status):
            return self._on_status(route, vm, link, message, now_ms)
        if isinstance(message, Bye):
            self.drop(vm, now_ms, "bye", printable(message.reason))  # peer text: escaped before any log
            self.ctx.request_recompute(f"{vm.vm_id} left", urgent=False)
            return [(route, self.ctx.frame(Bye(reason="dropped"), seq))]  # read: the agent may close now
        if isinstance(message, Heartbeat):
            return []
        raise ProtocolError(ErrorCode.UNEXPECTED_KIND, f"{message.kind} is not handled on the agent plane")

    def _proves_identity(self, existing: VmRecord | None, hello: Hello, user_id: str | None) -> bool:
        """A hello comes from the agent that holds this vm's registration: it presents the
        secret that only that agent's welcome carried, for this host session (or, under
        CURVE, it comes with the key the vm is bound to)."""
        link = None if existing is None else existing.agent
        if link is None:
            return False
        if self.agent_vm_ids is not None and user_id is not None and user_id == link.key_name:
            return True
        return (hello.vm_secret is not None and hello.last_host_session_id == self.ctx.session_id
                and hmac.compare_digest(hello.vm_secret, link.vm_secret))

    def _make_room(self, now_ms: int) -> None:
        """A new vm id: within the join rate, and within max_vms (forgetting the oldest dead)."""
        config, counters = self.ctx.config, self.ctx.counters
        if not self._joins.take(now_ms):
            counters["joins_refused_rate"] += 1
            raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, f"more than {config.max_joins_per_s} new vms per "
                                "second: try again shortly")
        if len(self.registry.vms) < config.max_vms:
            return
        dead = [vm for vm in self.registry.vms.values() if not vm.alive]
        if not dead:
            counters["joins_refused_full"] += 1
            raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, f"hostd keeps at most {config.max_vms} vms")
        self.ctx.forget(min(dead, key=lambda v: v.left_ms or 0))

    def _on_hello(self, route: bytes, seq: int, hello: Hello, now_ms: int, user_id: str | None = None) -> Outgoing:
        ctx, registry = self.ctx, self.registry
        bound = registry.by_route(route)
        if bound is not None and bound.vm_id != hello.vm_id and bound.alive:
            ctx.counters["identity_conflicts"] += 1
            raise ProtocolError(ErrorCode.CONFLICT, f"this connection is registered as {bound.vm_id}; "
                                "one connection speaks for one vm")
        existing = registry.vms.get(hello.vm_id)
        proven = self._proves_identity(existing, hello, user_id)
        if existing is not None and existing.alive and existing.has_agent and not proven:
            # Whoever else claims a live vm's id gets nothing: the live agent keeps its
            # registration, its ledger and its traffic.
            ctx.counters["identity_conflicts"] += 1
            ctx.event(now_ms, "identity_conflict", vm=hello.vm_id)
            raise ProtocolError(ErrorCode.CONFLICT, f"vm {hello.vm_id} is already registered by a live agent")
        if existing is None:
            self._make_room(now_ms)
        params = existing.params if existing is not None else ctx.initial_params(hello.vm_id)
        reservation = params.reservation_bytes // PAGE_SIZE_BYTES
        refusal = policy.admission_check([registry.reserved_pages(hello.vm_id)], reservation,
                                         ctx.settings.host_memory_pages, ctx.settings.sliding_min_free)
        if refusal:
            ctx.event(now_ms, "admission_refused", vm=hello.vm_id, reason=refusal)
            raise ProtocolError(ErrorCode.ADMISSION_REFUSED, f"vm {hello.vm_id}: {refusal}")
        if not proven:
            ctx.ledger.pop(hello.vm_id)
        ctx.ledger.register(hello.vm_id, hello.page_kind)
        # The same agent keeps its secret across reconnects.
        secret = existing.agent.vm_secret if proven and existing is not None and existing.agent is not None \
            else secrets.token_urlsafe(24)
        link = AgentLink(hello=hello, route=route, key_name=user_id, vm_secret=secret, proven=proven)
        vm = VmRecord(vm_id=hello.vm_id, params=params, last_seen_ms=now_ms, agent=link,
                      identity=Identity(claimed_memsz_bytes=hello.memsz_bytes, page_kind=hello.page_kind,
                                        cgroup_version=hello.cgroup_version, registered_ms=now_ms))
        if existing is not None:
            vm.targets.manual_balloon_pages = existing.targets.manual_balloon_pages
            vm.working_set = existing.working_set
            vm.resets = existing.resets
            vm.host = existing.host
        else:
            vm.targets.manual_balloon_pages = ctx.initial_manual_target(hello.vm_id)
        registry.bind_route(vm, route)
        vm.memsz_cap_pages = ctx.memsz_cap(vm)
        # Only where hostd can lower the limit (elsewhere the memory handed back would simply be
        # the guest's again), and only for virtual page numbers: frames handed back are reused
        # by the guest's next pins, and a ledger of PFNs would refuse them as duplicates.
        link.reclaim = (ctx.config.reclaim_mode and ctx.config.vswap and hello.vm_id in registry.host_targets
                        and hello.page_kind == "vpn")
        # Adopt what the agent still holds: it stays until the policy says otherwise.
        held = min(hello.held_pages, vm.memsz_pages)
        vm.targets.balloon_target_pages = held
        # A restarted host knows nothing of the vm's working set: deflating the adopted
        # balloon now would undo the previous host's decision. The first status brings the
        # agent's latest sample; the policy decides after that.
        link.adopted_awaiting_report = held > 0 and not proven
        vm.targets.balloon_max_pages = policy.balloon_max_pages(vm.memsz_pages, ctx.settings.ctl_max_percent,
                                                                vm.maxmemctl_pages)
        registry.put(vm)
        registry.set_usage(vm, balloon_pages=held)
        ctx.event(now_ms, "join", vm=hello.vm_id, memsz_bytes=vm.memsz_pages * PAGE_SIZE_BYTES,
                  claimed_memsz_bytes=hello.memsz_bytes, page_kind=hello.page_kind,
                  held_pages=held, reregistration=existing is not None)
        log.info("vm %s joined: memsz %d MiB (claimed %d MiB), %s page numbers, holding %d pages", hello.vm_id,
                 vm.memsz_pages >> 8, hello.memsz_bytes >> 20, hello.page_kind, held)
        config = ctx.config
        welcome = Welcome(
            host_session_id=ctx.session_id, report_interval_ms=config.report_interval_ms,
            host_timeout_ms=(config.lost_after_reports + 2) * config.report_interval_ms,
            batch_limit_pages=config.batch_limit_pages, sample_period_ms=ctx.settings.sample_period_ms,
            reclaim=link.reclaim, vm_secret=link.vm_secret,
        )
        ctx.request_recompute(f"{hello.vm_id} joined", urgent=False)
        ctx.vm_changed(hello.vm_id)
        return [(route, ctx.frame(welcome, seq))]

    def _check_batch(self, kind: str, page_count: int) -> None:
        """The welcome's batch_limit_pages, enforced before the ledger does any work."""
        limit = self.ctx.config.batch_limit_pages
        if page_count > limit:
            raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, f"{kind} of {page_count} pages: the batch limit is "
                                f"{limit} pages")

    def _on_lock(self, identity: bytes, seq: int, vm: VmRecord, lock: Lock) -> Outgoing:
        self._check_batch("lock", lock.pages.page_count)
        targets = vm.targets
        cap = vm.memsz_pages if lock.adopt else max(targets.balloon_max_pages, targets.balloon_target_pages,
                                                    targets.manual_balloon_pages or 0)
        results = self.ctx.ledger.lock(vm.vm_id, lock.pages, cap, lock.adopt)
        traffic = vm.traffic
        traffic.lock_batches += 1
        for result in results:
            if result.status == 0:
                traffic.locked_pages += result.count
            else:
                traffic.lock_refused_pages += result.count
        reply = LockResult(results=results, target_pages=targets.balloon_target_pages, target_seq=targets.target_seq)
        return [(identity, self.ctx.frame(reply, seq))]

    def _on_unlock(self, identity: bytes, seq: int, vm: VmRecord, unlock: Unlock) -> Outgoing:
        self._check_batch("unlock", unlock.pages.page_count)
        results = self.ctx.ledger.unlock(vm.vm_id, unlock.pages)
        vm.traffic.unlock_batches += 1
        vm.traffic.unlocked_pages += sum(r.count for r in results if r.status == 0)
        targets = vm.targets
        reply = UnlockResult(results=results, target_pages=targets.balloon_target_pages,
                             target_seq=targets.target_seq)
        return [(identity, self.ctx.frame(reply, seq))]

    def _on_status(self, identity: bytes, vm: VmRecord, link: AgentLink, status: Status, now_ms: int) -> Outgoing:
        # No answer: the agent knows the host is there because its sends get through (ZeroMQ
        # refuses them while no connection is up) and ZMTP heartbeats keep the connection honest.
        # An answer to every status was a third of hostd's CPU at 2,000 agents.
        ctx = self.ctx
        if len(status.stats) != len(link.hello.stats_keys):
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"status.stats has {len(status.stats)} values; the hello "
                                f"named {len(link.hello.stats_keys)}")
        link.status = status
        link.stat_values = checked_stats(status.stats)
        memsz_pages = vm.memsz_pages
        balloon = min(status.balloon_pages, memsz_pages)
        if status.agent_state == "refusing" or status.refused_pages > 0:
            link.refusing = True
        elif balloon >= vm.targets.balloon_target_pages:
            link.refusing = False
        # What the policy reads comes in typed, range-checked fields (the codec refused anything
        # else); `stats` is informational (status document, logs).
        usage = status.usage_bytes
        # Where hostd reads the vm's cgroup itself, that reading wins (observe_cgroup).
        consumed = min(usage // PAGE_SIZE_BYTES, memsz_pages) \
            if vm.host.cgroup_read_ms is None and usage is not None else None
        self.registry.set_usage(vm, consumed_pages=consumed, balloon_pages=balloon)
        if status.ws_touched_ratio is not None and status.ws_samples > link.ws_samples_seen:
            vm.working_set = vm.working_set.with_period(status.ws_touched_ratio, ctx.gains)
            link.ws_samples_seen = status.ws_samples
        if status.ws_current_ratio is not None:
            vm.working_set = vm.working_set.with_current(status.ws_current_ratio, ctx.gains)
        held = ctx.ledger.held_pages(vm.vm_id)
        if held != status.balloon_pages:
            link.mismatch_reports += 1
            if link.mismatch_reports >= MISMATCH_REPORTS_BEFORE_RESET:
                return self._reset(identity, vm, now_ms, held, status.balloon_pages)
        else:
            link.mismatch_reports = 0
        if link.adopted_awaiting_report and now_ms >= self.settle_until_ms:
            link.adopted_awaiting_report = False
            ctx.request_recompute(f"{vm.vm_id} reported after adoption")
        ctx.update_state(now_ms)
        return []

    def _reset(self, identity: bytes, vm: VmRecord, now_ms: int, ledger_pages: int, agent_pages: int) -> Outgoing:
        """ESX "pops" a balloon whose state it cannot trust: drop the ledger and make the agent
        register again and re-report what it holds."""
        ctx = self.ctx
        ctx.ledger.pop(vm.vm_id)
        self.registry.leave(vm, now_ms, "ledger reset")
        vm.resets += 1
        ctx.counters["resets"] += 1
        detail = f"ledger reset: host holds {ledger_pages} pages, agent reports {agent_pages}; say hello"
        ctx.event(now_ms, "reset", vm=vm.vm_id, ledger_pages=ledger_pages, agent_pages=agent_pages)
        log.warning("vm %s: %s", vm.vm_id, detail)
        return [(identity, ctx.error(ErrorCode.NOT_REGISTERED, detail, None))]

    def drop(self, vm: VmRecord, now_ms: int, kind: str, reason: str) -> None:
        """Its agent said bye, went silent or lost its key."""
        ctx = self.ctx
        popped = ctx.ledger.pop(vm.vm_id)
        ctx.counters["agents_lost" if kind == "lost" else "agents_left"] += 1
        ctx.vm_status_cache.pop(vm.vm_id, None)  # listed as departed now (or rebuilt without its agent)
        if vm.vm_id in self.registry.host_targets and vm.host.cgroup_limit_pages is not None and ctx.config.vswap:
            # The guest is still there (its cgroup is): without an agent, host swap is all
            # that can reclaim from it. Its pinned pages went with the agent's process.
            self.registry.detach_agent(vm)
            ctx.event(now_ms, kind, vm=vm.vm_id, reason=reason, ledger_pages=popped,
                      then="no agent: host swap only")
            log.info("vm %s %s (%s); ledger of %d pages dropped; host swap takes over", vm.vm_id, kind, reason,
                     popped)
            return
        never_reported = vm.status is None
        self.registry.leave(vm, now_ms, f"{kind}: {reason}")
        ctx.event(now_ms, kind, vm=vm.vm_id, reason=reason, ledger_pages=popped)
        if never_reported and vm.vm_id not in self.registry.host_targets:
            # It said hello and nothing more: nothing of it is worth keeping (and one-shot
            # identities would otherwise fill the table for dead_vm_ttl_ms).
            ctx.forget(vm)
        log.info("vm %s %s (%s); its ledger of %d pages dropped", vm.vm_id, kind, reason, popped)

    def route_gone(self, route: bytes, now_ms: int) -> None:
        """A reply to `route` could not be sent: its connection closed before hostd answered (the
        server calls this for replies only: a vm whose later set_target finds its connection
        closed is lost by silence, as before, and listed until then). A vm it registered that
        never reported, holds nothing and has no cgroup is dropped now (and so forgotten): a
        one-shot identity whose welcome came too late (review S11) would otherwise stay in the
        table, the policy and every status for lost_after_reports reports. Any other vm is kept
        (lost only by silence): its agent comes back on a new connection with its secret."""
        vm = self.registry.by_route(route)
        if vm is None or not vm.alive or vm.agent is None or vm.status is not None or vm.agent.proven \
                or vm.vm_id in self.registry.host_targets or self.ctx.ledger.held_pages(vm.vm_id):
            return  # reported, re-registered within this session, a cgroup, or a ledger: kept
        self.ctx.vm_changed(vm.vm_id)
        self.drop(vm, now_ms, "lost", "its connection closed before it reported")
        self.ctx.request_recompute(f"{vm.vm_id} left", urgent=False)

    def set_agent_keys(self, vm_ids_by_key: dict[str, frozenset[str]], now_ms: int) -> None:
        """CURVE's allowlist as it is now: vms whose key no longer binds them are dropped."""
        self.agent_vm_ids = vm_ids_by_key
        revoked = [vm for vm in self.registry.vms.values() if vm.alive and vm.agent is not None
                   and vm.agent.key_name is not None and vm.vm_id not in vm_ids_by_key.get(vm.agent.key_name, ())]
        for vm in revoked:
            assert vm.agent is not None
            self.drop(vm, now_ms, "revoked", f"key {vm.agent.key_name} is no longer allowed for it")
        if revoked:
            self.ctx.request_recompute(f"keys revoked for {', '.join(vm.vm_id for vm in revoked)}")
