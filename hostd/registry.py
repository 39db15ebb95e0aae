"""The vm table: one `VmRecord` per vm, and the `Registry` that is the one writer of what the
free-memory state is computed from (each vm's usage, whether it is alive, Σgranted) and of the
state itself. Pure: no sockets, files or clock; time is passed in.

A record is composed by concern: who the vm is (`Identity`, its live settings), its agent's
link (`AgentLink`, None for a vm known only by its cgroup), its balloon targets (`Targets`)
and hostd's own control of its cgroup (`HostControl`). The policy's result and its reasons
have one home, `Registry.result` (a record has no copy of them); the vm → host target map has
one home, `Registry.host_targets`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

from hostd import policy
from hostd.config import VmParams
from protocol import PAGE_SIZE_BYTES, Hello, Status, stats_map
from protocol.limits import MAX_PAGES


@dataclass
class Identity:
    """What the vm said it is (its hello), or what its cgroup said (an agentless vm)."""

    claimed_memsz_bytes: int
    page_kind: str = "vpn"
    cgroup_version: int = 0  # 0: not an agent's figure (agentless)
    registered_ms: int = 0


@dataclass
class AgentTraffic:
    """Lock and unlock batches the ledger answered for this registration."""

    lock_batches: int = 0
    unlock_batches: int = 0
    locked_pages: int = 0
    unlocked_pages: int = 0
    lock_refused_pages: int = 0  # pages the host's ledger refused the agent (not the guest's Status.refused_pages)


@dataclass
class AgentLink:
    """The registration of the vm's agent: its hello, its connection, what it last reported."""

    hello: Hello
    route: bytes  # the ROUTER routing id of the agent's connection
    key_name: str | None = None  # CURVE: the allowlisted key that registered it (the ZAP User-Id)
    vm_secret: str = ""  # proves a re-hello is this agent (handed out in the welcome)
    status: Status | None = None
    stat_values: tuple[int | float | None, ...] = ()  # the latest status's stats, range-checked
    ws_samples_seen: int = 0
    mismatch_reports: int = 0
    adopted_awaiting_report: bool = False  # keep an adopted balloon until the first status
    # Its agent refused pages (or said "refusing") since it last reached its target: what the
    # balloon cannot take is host swap's. Sticky until the balloon reaches its target, because
    # the agent's own refusal count and state come and go between reports.
    refusing: bool = False
    reclaim: bool = False  # its agent hands the balloon's memory back; its limit goes down by the balloon
    # It re-registered in this host session with its secret (or its bound CURVE key): an agent
    # hostd already knew. The hello's last_host_session_id alone proves nothing (it is public).
    proven: bool = False
    stat_index: dict[str, int] = field(default_factory=dict)  # stats name → position in status.stats

    def __post_init__(self) -> None:
        if not self.stat_index:
            self.stat_index = {name: index for index, name in enumerate(self.hello.stats_keys)}

    def stat(self, name: str) -> int | float | None:
        """One value of the latest status's stats, by the name the hello gave it."""
        index = self.stat_index.get(name)
        return None if index is None or self.status is None else self.stat_values[index]

    def stats(self) -> dict[str, int | float | None]:
        return stats_map(self.hello.stats_keys, self.stat_values) if self.status is not None else {}


@dataclass
class Targets:
    """The balloon's targets as hostd set them (the policy's figures are in Registry.result)."""

    balloon_target_pages: int = 0
    target_seq: int = 0
    balloon_max_pages: int = 0
    manual_balloon_pages: int | None = None
    reason: str = "joined"  # why, until the policy has decided for it


@dataclass
class HostControl:
    """hostd's own control of the vm's cgroup (host-level reclamation; hostd/vswap.py)."""

    cgroup_limit_pages: int | None = None  # the cgroup's own limit, before hostd lowered it
    cgroup_usage_pages: int = 0
    cgroup_swap_pages: int | None = None
    cgroup_read_ms: int | None = None  # when hostd last read its cgroup (its own figures win)
    vswap_limit_pages: int | None = None  # the limit hostd applies now; None = the cgroup's own
    vswap_reason: str = ""
    vswap_previous_limit_pages: int | None = None  # put back if the backend could not apply the new one
    frozen_since_ms: int | None = None
    block_cooldown_until_ms: int = 0
    backend_error: str | None = None


@dataclass
class VmRecord:
    vm_id: str
    identity: Identity
    params: VmParams  # its live settings (config, balloonctl set)
    last_seen_ms: int
    agent: AgentLink | None = None  # None: known only by its cgroup (no agent, or its agent was lost)
    targets: Targets = field(default_factory=Targets)
    host: HostControl = field(default_factory=HostControl)
    working_set: policy.WorkingSet = field(default_factory=policy.WorkingSet)
    traffic: AgentTraffic = field(default_factory=AgentTraffic)  # this registration's (kept if its agent is lost)
    memsz_cap_pages: int = MAX_PAGES  # what hostd can see: host memory, and the cgroup's own limit
    resets: int = 0
    left_ms: int | None = None  # when it left or was lost (it is forgotten dead_vm_ttl_ms later)
    left_reason: str = ""
    # Written by the Registry only (Σgranted follows them): read them through the properties.
    _alive: bool = True
    _consumed_pages: int = 0
    _balloon_pages: int = 0

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def consumed_pages(self) -> int:
        return self._consumed_pages

    @property
    def balloon_pages(self) -> int:
        return self._balloon_pages

    @property
    def has_agent(self) -> bool:
        return self.agent is not None

    @property
    def status(self) -> Status | None:
        return None if self.agent is None else self.agent.status

    @property
    def memsz_pages(self) -> int:
        """The claimed memsz, capped by what hostd can check: an agent's figures are hints."""
        return min(self.identity.claimed_memsz_bytes // PAGE_SIZE_BYTES, self.memsz_cap_pages)

    def stat(self, name: str) -> int | float | None:
        return None if self.agent is None else self.agent.stat(name)

    def stats(self) -> dict[str, int | float | None]:
        return {} if self.agent is None else self.agent.stats()

    @property
    def granted_pages(self) -> int:
        return max(0, self._consumed_pages - self._balloon_pages) if self._alive else 0

    def shares(self) -> int:
        return policy.resolve_shares(self.params.shares, self.memsz_pages)

    @property
    def limit_pages(self) -> int:
        return self.memsz_pages if self.params.limit_bytes is None else self.params.limit_bytes // PAGE_SIZE_BYTES

    @property
    def maxmemctl_pages(self) -> int | None:
        return None if self.params.maxmemctl_bytes is None else self.params.maxmemctl_bytes // PAGE_SIZE_BYTES

    @property
    def reservation_pages(self) -> int:
        return self.params.reservation_bytes // PAGE_SIZE_BYTES


class Outcome(NamedTuple):
    """The policy's figures for one vm from the latest recompute (zeros before its first)."""

    alloc_target_pages: int
    swap_target_pages: int
    rho: float
    active_pages: int


NO_OUTCOME = Outcome(0, 0, 0.0, 0)


class Registry:
    """The vm table and the figures derived from it, kept incrementally for 2,000 vms."""

    def __init__(self, host_targets: dict[str, str]) -> None:
        self.vms: dict[str, VmRecord] = {}
        self.routes: dict[bytes, str] = {}  # agent connection → the vm it registered
        self.host_targets = host_targets  # vm → a cgroup path or "docker:NAME"; the one home
        self.state: policy.State = "high"
        self._granted = 0
        self._alive_count = 0
        self._reserved_alive_pages: int | None = None  # Σ reservations of live vms (None: count again)
        self.result: policy.PolicyResult | None = None
        self._result_index: dict[str, int] = {}
        self._reasons: dict[str, str] = {}  # vm → reason under the latest result (worked out lazily)
        # No departed vm left before this: the tick's scan for vms to forget waits until the
        # oldest one's dead_vm_ttl_ms has passed (lowered by every departure, found again by the scan).
        self.oldest_left_ms: float = math.inf

    # ---- usage, Σgranted and the state: this class is their only writer --------------------
    @property
    def granted_pages(self) -> int:
        return self._granted

    def free_pages(self, host_memory_pages: int) -> int:
        return host_memory_pages - self._granted

    @property
    def alive_count(self) -> int:
        """Live vms (kept, not counted: the tick and every status read it)."""
        return self._alive_count

    def put(self, vm: VmRecord) -> VmRecord | None:
        """Enter `vm`, replacing the record of the same id (returned)."""
        old = self.vms.get(vm.vm_id)
        if old is not None:
            self._granted -= old.granted_pages
            self._alive_count -= old.alive
        self.vms[vm.vm_id] = vm
        if vm.left_ms is not None:
            self.oldest_left_ms = min(self.oldest_left_ms, vm.left_ms)
        self._granted += vm.granted_pages
        self._alive_count += vm.alive
        self._reserved_alive_pages = None if vm.params.reservation_bytes or (
            old is not None and old.params.reservation_bytes) else self._reserved_alive_pages
        return old

    def set_usage(self, vm: VmRecord, consumed_pages: int | None = None, balloon_pages: int | None = None) -> None:
        old = vm.granted_pages
        if consumed_pages is not None:
            vm._consumed_pages = consumed_pages
        if balloon_pages is not None:
            vm._balloon_pages = balloon_pages
        self._granted += vm.granted_pages - old

    def leave(self, vm: VmRecord, now_ms: int, reason: str) -> None:
        """The vm is no longer scheduled (kept, listed as departed, until it is forgotten)."""
        self._granted -= vm.granted_pages
        self._alive_count -= vm.alive
        vm._alive = False
        vm.left_ms, vm.left_reason = now_ms, reason[:200]
        self.oldest_left_ms = min(self.oldest_left_ms, now_ms)
        if vm.params.reservation_bytes:
            self._reserved_alive_pages = None
        self.unbind_route(vm)

    def detach_agent(self, vm: VmRecord) -> None:
        """Its agent is gone but its cgroup is not: host swap alone reclaims from it now."""
        self.unbind_route(vm)
        vm.agent = None
        vm.targets.balloon_target_pages = 0
        self.set_usage(vm, consumed_pages=vm.host.cgroup_usage_pages, balloon_pages=0)

    def forget(self, vm: VmRecord) -> None:
        self.unbind_route(vm)
        self._granted -= vm.granted_pages
        self._alive_count -= vm.alive
        del self.vms[vm.vm_id]
        self._result_index.pop(vm.vm_id, None)

    def next_state(self, host_memory_pages: int, thresholds: policy.Thresholds) -> policy.State | None:
        """The free-memory state after a usage change: the new state if it changed, else None."""
        new_state = policy.next_state(self.state, self.free_pages(host_memory_pages), thresholds)
        if new_state == self.state:
            return None
        self.state = new_state
        return new_state

    # ---- agent connections -----------------------------------------------------------------
    def bind_route(self, vm: VmRecord, route: bytes) -> None:
        assert vm.agent is not None
        self.routes[route] = vm.vm_id
        vm.agent.route = route

    def unbind_route(self, vm: VmRecord) -> None:
        if vm.agent is not None and vm.agent.route and self.routes.get(vm.agent.route) == vm.vm_id:
            del self.routes[vm.agent.route]

    def by_route(self, route: bytes) -> VmRecord | None:
        vm_id = self.routes.get(route)
        return None if vm_id is None else self.vms.get(vm_id)

    # ---- reservations ------------------------------------------------------------------------
    def reserved_pages(self, except_vm: str) -> int:
        """Σ reservations of the live vms other than `except_vm` (kept, not counted per hello)."""
        if self._reserved_alive_pages is None:
            self._reserved_alive_pages = sum(v.reservation_pages for v in self.vms.values() if v.alive)
        own = self.vms.get(except_vm)
        return self._reserved_alive_pages - (own.reservation_pages if own is not None and own.alive else 0)

    def set_params(self, vm: VmRecord, params: VmParams) -> None:
        vm.params = params
        self._reserved_alive_pages = None

    # ---- the policy's result: the one home of each vm's figures and reason -------------------
    def adopt_result(self, result: policy.PolicyResult, vms: list[VmRecord]) -> None:
        self.result = result
        self._result_index = {vm.vm_id: index for index, vm in enumerate(vms)}
        self._reasons = {}

    def outcome(self, vm: VmRecord) -> Outcome:
        index = self._result_index.get(vm.vm_id)
        if index is None or self.result is None:
            return NO_OUTCOME
        r = self.result
        return Outcome(int(r.alloc_target_pages[index]), int(r.swap_target_pages[index]), float(r.rho[index]),
                       int(r.active_pages[index]))

    def reason(self, vm: VmRecord) -> str:
        """Why the vm's targets are what they are, from the latest recompute."""
        index = self._result_index.get(vm.vm_id)
        if not vm.alive or index is None or self.result is None:
            return vm.targets.reason
        reason = self._reasons.get(vm.vm_id)
        if reason is None:  # worked out once per recompute, not once per snapshot
            reason = self._reasons[vm.vm_id] = self.result.decision(index).reason
        return reason
