"""hostd's state machine without I/O: frames and the clock go in, frames and events come out.

    core.handle_agent(identity, frame, now_ms)  -> [(identity, frame), ...] to send
    core.handle_control(frame, now_ms)          -> reply frame
    core.tick(now_ms)                           -> [(identity, frame), ...] (liveness, balance period)
    core.drain_events()                         -> [event dict, ...] for the JSON Lines log
    core.snapshot(now_ms)                       -> the `balloonctl status --json` document

`hostd.server` owns the sockets and the clock and calls these; tests call them directly. No
peer input can raise out of here: every failure becomes an `error` reply and a counter.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import math
import secrets
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from hostd import policy, vswap
from hostd.config import HostConfig, VmDefaults
from hostd.eventlog import printable
from hostd.ledger import Ledger
from hostd.status_doc import DepartedVm, StatusDocument, VmStatus
from protocol import (
    PAGE_SIZE_BYTES,
    Bye,
    ControlOk,
    Error,
    ErrorCode,
    GetStatus,
    Heartbeat,
    Hello,
    Lock,
    LockResult,
    Message,
    ProtocolError,
    SetHostParams,
    SetManualTarget,
    SetTarget,
    SetVmParams,
    Status,
    StatusReply,
    Unlock,
    UnlockResult,
    Welcome,
    decode,
    encode,
    stats_map,
)
from protocol.limits import (
    MAX_CONTROL_FRAME_BYTES,
    MAX_CONTROL_REQUEST_BYTES,
    MAX_FRAME_BYTES,
    MAX_MEMSZ_BYTES,
    MAX_PAGES,
)
from protocol.messages import VM_PARAM_KEYS, check_vm_id

log = logging.getLogger(__name__)

Outgoing = list[tuple[bytes, bytes]]
MISMATCH_REPORTS_BEFORE_RESET = 3
LOGGED_TARGETS_PER_RECOMPUTE = 10  # more target changes than this in one recompute: summed up in one line
SNAPSHOT_REUSE_MS = 250  # status requests within this share one document (any change rebuilds it)
MIN_HOST_MEMORY_BYTES = 16 << 20  # below this no vm can be allocated anything (ρ would be infinite)
MAX_STAT_VALUE = 1 << 53  # no guest figure is larger (bytes of a 1 PiB guest, or counters); beyond: unknown


def checked_stat(value: int | float | None) -> int | float | None:
    """A stat as hostd keeps it: finite, non-negative and bounded, else unknown (None)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= MAX_STAT_VALUE else None
    return value if math.isfinite(value) and 0.0 <= value <= MAX_STAT_VALUE else None


def int_stat(value: int | float | None) -> int | None:
    """A count or size stat as an integer (None stays unknown)."""
    return None if value is None else int(value)


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


@dataclass
class HostSettings:
    """The live, changeable host parameters (balloonctl host ...)."""

    host_memory_pages: int
    idle_tax_ratio: float
    ctl_max_percent: int
    sample_period_ms: int
    balance_period_ms: int
    sliding_min_free: bool

    @classmethod
    def from_config(cls, config: HostConfig) -> HostSettings:
        return cls(
            host_memory_pages=config.effective_host_memory_bytes // PAGE_SIZE_BYTES,
            idle_tax_ratio=config.idle_tax_ratio, ctl_max_percent=config.ctl_max_percent,
            sample_period_ms=config.sample_period_ms, balance_period_ms=config.balance_period_ms,
            sliding_min_free=config.sliding_min_free,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "host_memory_bytes": self.host_memory_pages * PAGE_SIZE_BYTES,
            "idle_tax_ratio": self.idle_tax_ratio,
            "ctl_max_percent": self.ctl_max_percent,
            "sample_period_ms": self.sample_period_ms,
            "balance_period_ms": self.balance_period_ms,
            "sliding_min_free": self.sliding_min_free,
        }


@dataclass
class VmRecord:
    vm_id: str
    hello: Hello
    params: VmDefaults
    registered_ms: int
    last_seen_ms: int
    alive: bool = True
    status: Status | None = None
    consumed_pages: int = 0
    balloon_pages: int = 0
    working_set: policy.WorkingSet = field(default_factory=policy.WorkingSet)
    ws_samples_seen: int = 0
    balloon_target_pages: int = 0
    target_seq: int = 0
    alloc_target_pages: int = 0
    balloon_max_pages: int = 0
    swap_target_pages: int = 0
    rho: float = 0.0
    active_pages: int = 0
    reason: str = "joined"
    manual_balloon_pages: int | None = None
    mismatch_reports: int = 0
    adopted_awaiting_report: bool = False  # keep an adopted balloon until the first status
    lock_batches: int = 0
    unlock_batches: int = 0
    locked_pages: int = 0
    unlocked_pages: int = 0
    refused_pages: int = 0
    resets: int = 0
    stat_index: dict[str, int] = field(default_factory=dict)  # stats name → position in status.stats
    # Host-level reclamation (vms with a cgroup in the config; hostd/vswap.py)
    has_agent: bool = True  # False: known only by its cgroup (no agent, or its agent was lost)
    host_target: str | None = None  # a cgroup path or "docker:NAME" ([vms.NAME] cgroup / container)
    cgroup_limit_pages: int | None = None  # the cgroup's own limit, before hostd lowered it
    cgroup_usage_pages: int = 0
    cgroup_swap_pages: int | None = None
    vswap_limit_pages: int | None = None  # the limit hostd applies now; None = the cgroup's own
    vswap_reason: str = ""
    vswap_previous_limit_pages: int | None = None  # put back if the backend could not apply the new one
    frozen_since_ms: int | None = None
    block_cooldown_until_ms: int = 0
    backend_error: str | None = None
    route: bytes = b""  # the ROUTER routing id of its agent's connection (b"": none)
    key_name: str | None = None  # CURVE: the allowlisted key that registered it (the ZAP User-Id)
    memsz_cap_pages: int = MAX_PAGES  # what hostd can see: host memory, and the cgroup's own limit
    stat_values: tuple[int | float | None, ...] = ()  # the latest status's stats, range-checked
    # Its agent refused pages (or said "refusing") since it last reached its target: what the
    # balloon cannot take is host swap's. Sticky until the balloon reaches its target, because
    # the agent's own refusal count and state come and go between reports.
    refusing: bool = False
    left_ms: int | None = None  # when it left or was lost (it is forgotten dead_vm_ttl_ms later)
    left_reason: str = ""
    cgroup_read_ms: int | None = None  # when hostd last read its cgroup (its own figures win)
    vm_secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))  # proves a re-hello is this agent
    reclaim: bool = False  # its agent hands the balloon's memory back; its limit goes down by the balloon

    @property
    def memsz_pages(self) -> int:
        """The claimed memsz, capped by what hostd can check: an agent's figures are hints."""
        return min(self.hello.memsz_bytes // PAGE_SIZE_BYTES, self.memsz_cap_pages)

    def stat(self, name: str) -> int | float | None:
        """One value of the latest status's stats, by the name the hello gave it."""
        index = self.stat_index.get(name)
        return None if index is None or self.status is None else self.stat_values[index]

    def stats(self) -> dict[str, int | float | None]:
        return stats_map(self.hello.stats_keys, self.stat_values) if self.status is not None else {}

    @property
    def granted_pages(self) -> int:
        return max(0, self.consumed_pages - self.balloon_pages) if self.alive else 0

    def shares(self) -> int:
        return policy.resolve_shares(self.params.shares, self.memsz_pages)

    @property
    def limit_pages(self) -> int:
        return self.memsz_pages if self.params.limit_bytes is None else self.params.limit_bytes // PAGE_SIZE_BYTES

    @property
    def maxmemctl_pages(self) -> int | None:
        return None if self.params.maxmemctl_bytes is None else self.params.maxmemctl_bytes // PAGE_SIZE_BYTES


class HostCore:
    def __init__(self, config: HostConfig, session_id: str, now_ms: int, control_token: str | None = None,
                 persisted: Mapping[str, Any] | None = None, max_pfn: int | None = None) -> None:
        """`max_pfn`: one past the host's highest page frame (PFN ranges beyond are INVALID)."""
        self.config = config
        # Authority for control changes without CURVE: the token in control_token_file.
        self.control_token = control_token
        # CURVE: key name (ZAP User-Id) → the vm ids it may register; None = no CURVE.
        self.agent_vm_ids: dict[str, frozenset[str]] | None = None
        self._joins = JoinBucket(config.max_joins_per_s, now_ms)
        self._reserved_alive_pages: int | None = None  # Σ reservations of live vms (None: count again)
        self._snapshot_cache: tuple[int, StatusDocument] | None = None
        self.session_id = session_id
        self.settings = HostSettings.from_config(config)
        self.gains = policy.EwmaGains()
        self.vms: dict[str, VmRecord] = {}
        self.ledger = Ledger(max_pfn=max_pfn)
        self.state: policy.State = "high"
        self.started_ms = now_ms
        self.next_balance_ms = now_ms + self.settings.balance_period_ms
        self.last_recompute_ms: float = 0.0
        self.protocol_errors: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()
        self._events: list[dict[str, Any]] = []
        self._seq = 0
        self._target_seq = 0
        self._granted_total = 0
        # After a (re)start, agents come back one by one; the first alone would look like an
        # undercommitted host and lose its adopted balloon. Adopted balloons are held until
        # every agent has had time to notice the new session (its host timeout + a retry).
        self.settle_until_ms = now_ms + (config.lost_after_reports + 4) * config.report_interval_ms
        self._settled = False
        self._pending_triggers: dict[str, None] = {}  # ordered set of reasons for the next recompute
        self._last_result: policy.PolicyResult | None = None
        self._last_result_index: dict[str, int] = {}
        self._reasons: dict[str, str] = {}  # vm → reason under the last result
        self._host_targets = config.host_targets
        # balloonctl's changes, kept across restarts by the server (settings_file): host keys
        # changed from the config, and per-vm settings and manual targets.
        self._host_overrides: dict[str, Any] = {}
        self._vm_overrides: dict[str, dict[str, Any]] = {}
        self.settings_dirty = False
        self._routes: dict[bytes, str] = {}  # agent connection → the vm it registered

    # ---- settings kept across restarts -------------------------------------------------
    def restore_settings(self, document: Mapping[str, Any], now_ms: int) -> list[str]:
        """Apply what `settings_document()` saved before a restart; what no longer passes
        validation is skipped with a reason (returned for the log)."""
        skipped = []
        host = document.get("host")
        if isinstance(host, dict) and host:
            try:
                self._set_host_params(SetHostParams(params=host), now_ms)
            except (ProtocolError, TypeError, ValueError) as exc:
                skipped.append(f"host settings {host}: {exc}")
        vms = document.get("vms")
        for vm_id, entry in (vms.items() if isinstance(vms, dict) else ()):
            try:
                check_vm_id(vm_id)
                params = {k: v for k, v in entry.get("params", {}).items() if k in VM_PARAM_KEYS}
                if params:
                    SetVmParams(vm_id=vm_id, params=params)  # validates every value
                manual = entry.get("manual_balloon_pages")
                if manual is not None and (isinstance(manual, bool) or not isinstance(manual, int)
                                           or not 0 <= manual <= MAX_PAGES):
                    raise ValueError(f"manual_balloon_pages {manual!r}")
                self._vm_overrides[vm_id] = {"params": params, "manual_balloon_pages": manual}
            except (ProtocolError, AttributeError, TypeError, ValueError) as exc:
                skipped.append(f"vm {vm_id!r}: {exc}")
        self.settings_dirty = False
        return skipped

    def settings_document(self) -> dict[str, Any]:
        return {"host": dict(self._host_overrides), "vms": {k: dict(v) for k, v in self._vm_overrides.items()}}

    def _initial_params(self, vm_id: str) -> VmDefaults:
        params = self.config.vms.get(vm_id, VmDefaults())
        saved = self._vm_overrides.get(vm_id, {}).get("params")
        if saved:
            values = {"shares": params.shares, "reservation_bytes": params.reservation_bytes,
                      "limit_bytes": params.limit_bytes, "maxmemctl_bytes": params.maxmemctl_bytes, **saved}
            params = VmDefaults(**values)
        return params

    def _initial_manual_target(self, vm_id: str) -> int | None:
        value = self._vm_overrides.get(vm_id, {}).get("manual_balloon_pages")
        return value if isinstance(value, int) else None

    # ---- helpers ----------------------------------------------------------------------
    def _frame(self, message: Message, seq: int | None = None, max_frame_bytes: int = MAX_FRAME_BYTES) -> bytes:
        if seq is None:
            self._seq += 1
            seq = self._seq
        return encode(message, seq, max_frame_bytes)

    def _event(self, now_ms: int, kind: str, **fields: Any) -> None:
        self._events.append({"t_ms": now_ms - self.started_ms, "event": kind, "state": self.state, **fields})

    def drain_events(self) -> list[dict[str, Any]]:
        events, self._events = self._events, []
        return events

    def thresholds(self) -> policy.Thresholds:
        return policy.thresholds(self.settings.host_memory_pages, self.settings.sliding_min_free)

    def free_pages(self) -> int:
        return self.settings.host_memory_pages - self._granted_total

    def _error(self, code: ErrorCode, detail: str, in_reply_to: int | None) -> bytes:
        return self._frame(Error(code=int(code), detail=detail[:1000], in_reply_to=in_reply_to), in_reply_to)

    # ---- agent plane ------------------------------------------------------------------
    def handle_agent(self, identity: bytes, frame: bytes, now_ms: int, user_id: str | None = None) -> Outgoing:
        """`user_id`: the ZAP User-Id of the connection (the allowlisted key's name) under CURVE."""
        self._snapshot_cache = None  # what status shows changes with every agent frame
        seq: int | None = None
        try:
            envelope = decode(frame)
            message, seq = envelope.message, envelope.seq
            return self._dispatch_agent(identity, seq, message, now_ms, user_id)
        except ProtocolError as exc:
            self.protocol_errors[exc.code.name] += 1
            return [(identity, self._error(exc.code, exc.detail, seq))]
        except Exception:  # a bug, never the peer's fault to crash us for: log it, answer, go on
            self.protocol_errors["INTERNAL"] += 1
            log.exception("internal error on an agent frame (%d bytes)", len(frame))
            return [(identity, self._error(ErrorCode.INTERNAL, "internal error; see hostd's log", seq))]

    def _dispatch_agent(self, route: bytes, seq: int, message: Message, now_ms: int,
                        user_id: str | None) -> Outgoing:
        if message.plane != "agent" or isinstance(message, Welcome | SetTarget | LockResult | UnlockResult):
            raise ProtocolError(ErrorCode.UNEXPECTED_KIND, f"{message.kind} is not sent by agents")
        if isinstance(message, Hello):
            if self.agent_vm_ids is not None and message.vm_id not in self.agent_vm_ids.get(user_id or "", ()):
                self.counters["identity_refused"] += 1
                raise ProtocolError(ErrorCode.UNAUTHORIZED, f"key {user_id!r} may not register vm {message.vm_id}")
            return self._on_hello(route, seq, message, now_ms, user_id)
        # A connection speaks for the vm its hello registered, never for the vm it names:
        # routing ids are the ROUTER's, one per connection, and bound at welcome.
        vm_id = self._routes.get(route)
        vm = None if vm_id is None else self.vms.get(vm_id)
        if vm is None or not vm.alive or not vm.has_agent or vm.route != route:
            raise ProtocolError(ErrorCode.NOT_REGISTERED, "not registered with this host session: say hello")
        if self.agent_vm_ids is not None and (user_id != vm.key_name
                                              or vm.vm_id not in self.agent_vm_ids.get(user_id or "", ())):
            # Checked on every frame, not only at hello: a key removed from the allowlist
            # stops working at once, even on a connection it had already opened.
            self.counters["identity_refused"] += 1
            raise ProtocolError(ErrorCode.UNAUTHORIZED, f"key {user_id!r} may not speak for vm {vm.vm_id}")
        vm.last_seen_ms = now_ms
        if isinstance(message, Lock):
            return self._on_lock(route, seq, vm, message)
        if isinstance(message, Unlock):
            return self._on_unlock(route, seq, vm, message)
        if isinstance(message, Status):
            return self._on_status(route, vm, message, now_ms)
        if isinstance(message, Bye):
            self._drop(vm, now_ms, "bye", printable(message.reason))  # peer text: escaped before any log
            self._request_recompute(f"{vm.vm_id} left")
            return []
        if isinstance(message, Heartbeat):
            return []
        raise ProtocolError(ErrorCode.UNEXPECTED_KIND, f"{message.kind} is not handled on the agent plane")

    def _proves_identity(self, existing: VmRecord | None, hello: Hello, user_id: str | None) -> bool:
        """A hello comes from the agent that holds this vm's registration: it presents the
        secret that only that agent's welcome carried, for this host session (or, under
        CURVE, it comes with the key the vm is bound to)."""
        if existing is None or not existing.has_agent:
            return False
        if self.agent_vm_ids is not None and user_id is not None and user_id == existing.key_name:
            return True
        return (hello.vm_secret is not None and hello.last_host_session_id == self.session_id
                and hmac.compare_digest(hello.vm_secret, existing.vm_secret))

    def _reserved_pages(self, except_vm: str) -> int:
        """Σ reservations of the live vms other than `except_vm` (kept, not counted per hello)."""
        if self._reserved_alive_pages is None:
            self._reserved_alive_pages = sum(v.params.reservation_bytes // PAGE_SIZE_BYTES
                                             for v in self.vms.values() if v.alive)
        own = self.vms.get(except_vm)
        mine = own.params.reservation_bytes // PAGE_SIZE_BYTES if own is not None and own.alive else 0
        return self._reserved_alive_pages - mine

    def _reservation_left(self, vm: VmRecord) -> None:
        if vm.params.reservation_bytes:
            self._reserved_alive_pages = None

    def _memsz_cap(self, vm: VmRecord) -> int:
        """What hostd can see of a vm's size: its cgroup's own limit where hostd reads it (a
        guest may be larger than the host: that is overcommit), else host memory."""
        return self.settings.host_memory_pages if vm.cgroup_limit_pages is None else vm.cgroup_limit_pages

    def _make_room(self, now_ms: int) -> None:
        """A new vm id: within the join rate, and within max_vms (forgetting the oldest dead)."""
        if not self._joins.take(now_ms):
            self.counters["joins_refused_rate"] += 1
            raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, f"more than {self.config.max_joins_per_s} new vms per "
                                "second: try again shortly")
        if len(self.vms) < self.config.max_vms:
            return
        dead = [vm for vm in self.vms.values() if not vm.alive]
        if not dead:
            self.counters["joins_refused_full"] += 1
            raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, f"hostd keeps at most {self.config.max_vms} vms")
        self._forget(min(dead, key=lambda v: v.left_ms or 0))

    def _bind_route(self, vm: VmRecord, route: bytes) -> None:
        if vm.route and self._routes.get(vm.route) == vm.vm_id:
            del self._routes[vm.route]
        vm.route = route
        self._routes[route] = vm.vm_id

    def _unbind_route(self, vm: VmRecord) -> None:
        if vm.route and self._routes.get(vm.route) == vm.vm_id:
            del self._routes[vm.route]

    def _on_hello(self, route: bytes, seq: int, hello: Hello, now_ms: int, user_id: str | None = None) -> Outgoing:
        bound = self._routes.get(route)
        if bound is not None and bound != hello.vm_id and self.vms[bound].alive:
            self.counters["identity_conflicts"] += 1
            raise ProtocolError(ErrorCode.CONFLICT, f"this connection is registered as {bound}; "
                                "one connection speaks for one vm")
        existing = self.vms.get(hello.vm_id)
        proven = self._proves_identity(existing, hello, user_id)
        if existing is not None and existing.alive and existing.has_agent and not proven:
            # Whoever else claims a live vm's id gets nothing: the live agent keeps its
            # registration, its ledger and its traffic.
            self.counters["identity_conflicts"] += 1
            self._event(now_ms, "identity_conflict", vm=hello.vm_id)
            raise ProtocolError(ErrorCode.CONFLICT, f"vm {hello.vm_id} is already registered by a live agent")
        same_session = proven
        if existing is None:
            self._make_room(now_ms)
        params = existing.params if existing is not None else self._initial_params(hello.vm_id)
        reservation = params.reservation_bytes // PAGE_SIZE_BYTES
        refusal = policy.admission_check([self._reserved_pages(hello.vm_id)], reservation,
                                         self.settings.host_memory_pages, self.settings.sliding_min_free)
        if refusal:
            self._event(now_ms, "admission_refused", vm=hello.vm_id, reason=refusal)
            raise ProtocolError(ErrorCode.ADMISSION_REFUSED, f"vm {hello.vm_id}: {refusal}")
        if existing is not None and existing.alive:
            self._granted_total -= existing.granted_pages
        if not same_session:
            self.ledger.pop(hello.vm_id)
        self.ledger.register(hello.vm_id, hello.page_kind)
        vm = VmRecord(vm_id=hello.vm_id, hello=hello, params=params, registered_ms=now_ms, last_seen_ms=now_ms,
                      stat_index={name: index for index, name in enumerate(hello.stats_keys)}, key_name=user_id)
        if proven:
            assert existing is not None
            vm.vm_secret = existing.vm_secret  # the same agent keeps its secret across reconnects
        self._bind_route(vm, route)
        if existing is not None:
            vm.manual_balloon_pages = existing.manual_balloon_pages
            vm.working_set = existing.working_set
            vm.resets = existing.resets
            self._carry_host_side(existing, vm)
        else:
            vm.host_target = self._host_targets.get(hello.vm_id)
            vm.manual_balloon_pages = self._initial_manual_target(hello.vm_id)
        vm.memsz_cap_pages = self._memsz_cap(vm)
        # Only where hostd can lower the limit (elsewhere the memory handed back would simply be
        # the guest's again), and only for virtual page numbers: frames handed back are reused
        # by the guest's next pins, and a ledger of PFNs would refuse them as duplicates.
        vm.reclaim = (self.config.reclaim_mode and self.config.vswap and vm.host_target is not None
                      and hello.page_kind == "vpn")
        # Adopt what the agent still holds: it stays until the policy says otherwise.
        held = min(hello.held_pages, vm.memsz_pages)
        vm.balloon_target_pages = held
        vm.balloon_pages = held
        # A restarted host knows nothing of the vm's working set: deflating the adopted
        # balloon now would undo the previous host's decision. The first status brings the
        # agent's latest sample; the policy decides after that.
        vm.adopted_awaiting_report = held > 0 and not same_session
        vm.balloon_max_pages = policy.balloon_max_pages(vm.memsz_pages, self.settings.ctl_max_percent,
                                                        vm.maxmemctl_pages)
        self.vms[hello.vm_id] = vm
        if reservation or (existing is not None and existing.params.reservation_bytes):
            self._reserved_alive_pages = None  # most vms reserve nothing: no recount per hello
        self._event(now_ms, "join", vm=hello.vm_id, memsz_bytes=vm.memsz_pages * PAGE_SIZE_BYTES,
                    claimed_memsz_bytes=hello.memsz_bytes, page_kind=hello.page_kind,
                    held_pages=held, reregistration=existing is not None)
        log.info("vm %s joined: memsz %d MiB (claimed %d MiB), %s page numbers, holding %d pages", hello.vm_id,
                 vm.memsz_pages >> 8, hello.memsz_bytes >> 20, hello.page_kind, held)
        welcome = Welcome(
            host_session_id=self.session_id, report_interval_ms=self.config.report_interval_ms,
            host_timeout_ms=(self.config.lost_after_reports + 2) * self.config.report_interval_ms,
            batch_limit_pages=self.config.batch_limit_pages,
            settings={"idle_tax_ratio": self.settings.idle_tax_ratio,
                      "sample_period_ms": self.settings.sample_period_ms,
                      "balance_period_ms": self.settings.balance_period_ms,
                      "ctl_max_percent": self.settings.ctl_max_percent, "state": self.state,
                      "reclaim": vm.reclaim},
            vm_secret=vm.vm_secret,
        )
        self._request_recompute(f"{hello.vm_id} joined")
        return [(route, self._frame(welcome, seq))]

    def _lock_cap(self, vm: VmRecord) -> int:
        return max(vm.balloon_max_pages, vm.balloon_target_pages, vm.manual_balloon_pages or 0)

    def _check_batch(self, kind: str, page_count: int) -> None:
        """The welcome's batch_limit_pages, enforced before the ledger does any work."""
        if page_count > self.config.batch_limit_pages:
            raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, f"{kind} of {page_count} pages: the batch limit is "
                                f"{self.config.batch_limit_pages} pages")

    def _on_lock(self, identity: bytes, seq: int, vm: VmRecord, lock: Lock) -> Outgoing:
        self._check_batch("lock", lock.pages.page_count)
        cap = vm.memsz_pages if lock.adopt else self._lock_cap(vm)
        results = self.ledger.lock(vm.vm_id, lock.pages, cap, lock.adopt)
        vm.lock_batches += 1
        for result in results:
            if result.status == 0:
                vm.locked_pages += result.count
            else:
                vm.refused_pages += result.count
        reply = LockResult(results=results, target_pages=vm.balloon_target_pages, target_seq=vm.target_seq)
        return [(identity, self._frame(reply, seq))]

    def _on_unlock(self, identity: bytes, seq: int, vm: VmRecord, unlock: Unlock) -> Outgoing:
        self._check_batch("unlock", unlock.pages.page_count)
        results = self.ledger.unlock(vm.vm_id, unlock.pages)
        vm.unlock_batches += 1
        vm.unlocked_pages += sum(r.count for r in results if r.status == 0)
        reply = UnlockResult(results=results, target_pages=vm.balloon_target_pages, target_seq=vm.target_seq)
        return [(identity, self._frame(reply, seq))]

    def _on_status(self, identity: bytes, vm: VmRecord, status: Status, now_ms: int) -> Outgoing:
        # No answer: the agent knows the host is there because its sends get through (ZeroMQ
        # refuses them while no connection is up) and ZMTP heartbeats keep the connection honest.
        # An answer to every status was a third of hostd's CPU at 2,000 agents.
        out: Outgoing = []
        if len(status.stats) != len(vm.hello.stats_keys):
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"status.stats has {len(status.stats)} values; the hello "
                                f"named {len(vm.hello.stats_keys)}")
        old_granted = vm.granted_pages
        vm.status = status
        vm.stat_values = tuple(checked_stat(value) for value in status.stats)
        vm.balloon_pages = min(status.balloon_pages, vm.memsz_pages)
        if status.agent_state == "refusing" or status.refused_pages > 0:
            vm.refusing = True
        elif vm.balloon_pages >= vm.balloon_target_pages:
            vm.refusing = False
        usage = vm.stat("usage_bytes")
        if vm.cgroup_read_ms is None and isinstance(usage, int):
            # Where hostd reads the vm's cgroup itself, that reading wins (observe_cgroup).
            vm.consumed_pages = min(usage // PAGE_SIZE_BYTES, vm.memsz_pages)
        self._granted_total += vm.granted_pages - old_granted
        samples = vm.stat("ws_samples")
        if status.ws_touched_ratio is not None and isinstance(samples, int) and samples > vm.ws_samples_seen:
            vm.working_set = vm.working_set.with_period(status.ws_touched_ratio, self.gains)
            vm.ws_samples_seen = samples
        current = vm.stat("ws_current_ratio")
        if isinstance(current, float | int) and 0.0 <= current <= 1.0:
            vm.working_set = vm.working_set.with_current(float(current), self.gains)
        held = self.ledger.held_pages(vm.vm_id)
        if held != status.balloon_pages:
            vm.mismatch_reports += 1
            if vm.mismatch_reports >= MISMATCH_REPORTS_BEFORE_RESET:
                return out + self._reset(identity, vm, now_ms, held, status.balloon_pages)
        else:
            vm.mismatch_reports = 0
        if vm.adopted_awaiting_report and now_ms >= self.settle_until_ms:
            vm.adopted_awaiting_report = False
            self._request_recompute(f"{vm.vm_id} reported after adoption")
        new_state = policy.next_state(self.state, self.free_pages(), self.thresholds())
        if new_state != self.state:
            self._change_state(new_state, now_ms)
        return out

    def _reset(self, identity: bytes, vm: VmRecord, now_ms: int, ledger_pages: int, agent_pages: int) -> Outgoing:
        """ESX "pops" a balloon whose state it cannot trust: drop the ledger and make the agent
        register again and re-report what it holds."""
        self.ledger.pop(vm.vm_id)
        self._granted_total -= vm.granted_pages
        vm.alive = False
        vm.left_ms, vm.left_reason = now_ms, "ledger reset"
        self._reservation_left(vm)
        self._unbind_route(vm)
        vm.resets += 1
        self.counters["resets"] += 1
        detail = f"ledger reset: host holds {ledger_pages} pages, agent reports {agent_pages}; say hello"
        self._event(now_ms, "reset", vm=vm.vm_id, ledger_pages=ledger_pages, agent_pages=agent_pages)
        log.warning("vm %s: %s", vm.vm_id, detail)
        return [(identity, self._error(ErrorCode.NOT_REGISTERED, detail, None))]

    def _drop(self, vm: VmRecord, now_ms: int, kind: str, reason: str) -> None:
        self._unbind_route(vm)
        self._granted_total -= vm.granted_pages
        popped = self.ledger.pop(vm.vm_id)
        self.counters["agents_lost" if kind == "lost" else "agents_left"] += 1
        if vm.host_target is not None and vm.cgroup_limit_pages is not None and self.config.vswap:
            # The guest is still there (its cgroup is): without an agent, host swap is all
            # that can reclaim from it. Its pinned pages went with the agent's process.
            vm.has_agent, vm.balloon_pages, vm.balloon_target_pages, vm.status = False, 0, 0, None
            vm.consumed_pages = vm.cgroup_usage_pages
            self._granted_total += vm.granted_pages
            self._event(now_ms, kind, vm=vm.vm_id, reason=reason, ledger_pages=popped,
                        then="no agent: host swap only")
            log.info("vm %s %s (%s); ledger of %d pages dropped; host swap takes over", vm.vm_id, kind, reason,
                     popped)
            return
        vm.alive = False
        vm.left_ms, vm.left_reason = now_ms, f"{kind}: {reason}"[:200]
        self._reservation_left(vm)
        self._event(now_ms, kind, vm=vm.vm_id, reason=reason, ledger_pages=popped)
        if vm.status is None and vm.host_target is None:
            # It said hello and nothing more: nothing of it is worth keeping (and one-shot
            # identities would otherwise fill the table for dead_vm_ttl_ms).
            self._forget(vm)
        log.info("vm %s %s (%s); its ledger of %d pages dropped", vm.vm_id, kind, reason, popped)

    def _forget(self, vm: VmRecord) -> None:
        """A dead vm leaves the table (its settings stay in the config and settings_file)."""
        self._unbind_route(vm)
        self.ledger.pop(vm.vm_id)
        del self.vms[vm.vm_id]
        self._last_result_index.pop(vm.vm_id, None)
        self.counters["vms_forgotten"] += 1

    def set_agent_keys(self, vm_ids_by_key: dict[str, frozenset[str]], now_ms: int) -> None:
        """CURVE's allowlist as it is now: vms whose key no longer binds them are dropped."""
        self.agent_vm_ids = vm_ids_by_key
        revoked = [vm for vm in self.vms.values() if vm.alive and vm.has_agent and vm.key_name is not None
                   and vm.vm_id not in vm_ids_by_key.get(vm.key_name, ())]
        for vm in revoked:
            self._drop(vm, now_ms, "revoked", f"key {vm.key_name} is no longer allowed for it")
        if revoked:
            self._request_recompute(f"keys revoked for {', '.join(vm.vm_id for vm in revoked)}")

    @staticmethod
    def _carry_host_side(old: VmRecord, new: VmRecord) -> None:
        for name in ("host_target", "cgroup_limit_pages", "cgroup_usage_pages", "cgroup_swap_pages", "cgroup_read_ms",
                     "vswap_limit_pages", "vswap_reason", "frozen_since_ms", "block_cooldown_until_ms",
                     "backend_error"):
            setattr(new, name, getattr(old, name))

    # ---- host-level reclamation (cgroups; decisions in hostd/vswap.py) ------------------
    def observe_cgroup(self, vm_id: str, usage_bytes: int, swap_bytes: int | None, own_limit_bytes: int | None,
                       now_ms: int) -> None:
        """The server's reading of a configured vm's cgroup (once a second). A vm with no
        agent becomes known this way; `own_limit_bytes` is the cgroup's limit before hostd
        changed it (its memsz when it has no agent)."""
        self._snapshot_cache = None
        paged = None if own_limit_bytes is None else own_limit_bytes // PAGE_SIZE_BYTES * PAGE_SIZE_BYTES
        if paged is not None and not PAGE_SIZE_BYTES <= paged <= MAX_MEMSZ_BYTES:  # S24: a Hello would refuse it
            self.counters["cgroup_limit_out_of_range"] += 1
            own_limit_bytes = None  # no limit: not scheduled, or the last good one kept
        vm = self.vms.get(vm_id)
        if vm is None or not vm.alive:
            if own_limit_bytes is None:
                self.counters["cgroup_without_limit"] += 1
                return  # no memsz to schedule against; the event was logged by the server
            hello = Hello(vm_id=vm_id, memsz_bytes=own_limit_bytes // PAGE_SIZE_BYTES * PAGE_SIZE_BYTES,
                          agent_version="none", page_kind="vpn", supports_2m=False, cgroup_version=0,
                          max_batch_pages=1, held_pages=0, last_host_session_id=None, stats_keys=())
            params = vm.params if vm is not None else self.config.vms.get(vm_id, VmDefaults())
            record = VmRecord(vm_id=vm_id, hello=hello, params=params, registered_ms=now_ms, last_seen_ms=now_ms,
                              has_agent=False, reason="cgroup only (no agent)")
            if vm is not None:
                self._carry_host_side(vm, record)
            record.host_target = self._host_targets.get(vm_id)
            record.balloon_max_pages = policy.balloon_max_pages(record.memsz_pages, self.settings.ctl_max_percent,
                                                                record.maxmemctl_pages)
            self.vms[vm_id] = vm = record
            self._event(now_ms, "join", vm=vm_id, memsz_bytes=hello.memsz_bytes, agent=False,
                        host_target=vm.host_target)
            log.info("vm %s joined without an agent: %s, memsz %d MiB", vm_id, vm.host_target,
                     hello.memsz_bytes >> 20)
            self._request_recompute(f"{vm_id} joined (cgroup only)")
        if own_limit_bytes is not None:
            vm.cgroup_limit_pages = own_limit_bytes // PAGE_SIZE_BYTES
        vm.cgroup_usage_pages = usage_bytes // PAGE_SIZE_BYTES
        vm.cgroup_swap_pages = None if swap_bytes is None else swap_bytes // PAGE_SIZE_BYTES
        vm.cgroup_read_ms = now_ms
        vm.memsz_cap_pages = self._memsz_cap(vm)
        if not vm.has_agent:
            vm.last_seen_ms = now_ms
        # hostd's own reading of the cgroup, not the agent's report, is what the vm holds.
        old_granted = vm.granted_pages
        vm.consumed_pages = min(vm.cgroup_usage_pages, vm.memsz_pages)
        self._granted_total += vm.granted_pages - old_granted
        new_state = policy.next_state(self.state, self.free_pages(), self.thresholds())
        if new_state != self.state:
            self._change_state(new_state, now_ms)

    def set_host_target(self, vm_id: str, target: str) -> None:
        """A target found at run time (a container labelled for the vm)."""
        self._host_targets[vm_id] = target
        vm = self.vms.get(vm_id)
        if vm is not None:
            vm.host_target = target

    def cgroup_gone(self, vm_id: str, now_ms: int, reason: str) -> None:
        vm = self.vms.get(vm_id)
        if vm is not None and vm.alive and not vm.has_agent:
            self._granted_total -= vm.granted_pages
            vm.alive = False
            vm.left_ms, vm.left_reason = now_ms, f"cgroup gone: {reason}"[:200]
            self._reservation_left(vm)
            self._event(now_ms, "left", vm=vm_id, reason=reason)

    def host_actions(self, now_ms: int) -> list[tuple[str, str, str, int | None]]:
        """What the backend should do now: (vm, cgroup, "limit" | "freeze" | "thaw" | "pageout",
        limit bytes or None = the cgroup's own limit; "pageout": bytes hostd pages out itself,
        vswap_mode blind). The vm records assume success; the server reports failures with
        `host_action_failed`."""
        actions: list[tuple[str, str, str, int | None]] = []
        if not self.config.vswap:
            return actions
        step = max(1, self.config.vswap_step_bytes // PAGE_SIZE_BYTES)
        for vm in self.vms.values():
            if vm.host_target is None or vm.cgroup_limit_pages is None or not vm.alive:
                continue
            agent_usable = vm.has_agent and not vm.refusing
            # Reclaim mode: the balloon's memory is the host's (the agent let it go once the
            # ledger had it), so the guest's ceiling is its own limit less the balloon, at once.
            returned = self.ledger.held_pages(vm.vm_id) if vm.reclaim and vm.has_agent else 0
            # Never below what vswap would leave the guest (reservation + 16 MiB), whatever ledger
            # an agent built: its lock frames are hints too.
            floor = vm.params.reservation_bytes // PAGE_SIZE_BYTES + vswap.FLOOR_MARGIN_PAGES
            ceiling = max(vm.cgroup_limit_pages - returned, min(floor, vm.cgroup_limit_pages))
            limit_in = vswap.LimitInput(
                memsz_pages=ceiling, applied_limit_pages=vm.vswap_limit_pages,
                usage_pages=vm.cgroup_usage_pages, balloon_pages=0 if vm.reclaim else vm.balloon_pages,
                reservation_pages=vm.params.reservation_bytes // PAGE_SIZE_BYTES,
                swap_target_pages=vm.swap_target_pages, swap_due=vswap.swap_due(self.state, agent_usable))
            decision = vswap.next_limit(limit_in, step)
            if returned and decision.limit_pages is None:
                applied = vm.vswap_limit_pages if vm.vswap_limit_pages is not None else vm.cgroup_limit_pages
                stepped = max(ceiling, applied - step)  # down by at most a step a second, as vswap does
                decision = vswap.LimitDecision(stepped, f"reclaim: balloon of {returned} pages returned to the host")
            if decision.limit_pages != vm.vswap_limit_pages:
                old = vm.vswap_previous_limit_pages = vm.vswap_limit_pages
                vm.vswap_limit_pages, vm.vswap_reason = decision.limit_pages, decision.reason
                limit_bytes = None if decision.limit_pages is None else decision.limit_pages * PAGE_SIZE_BYTES
                if self.config.vswap_mode == "blind" and decision.limit_pages is not None \
                        and vm.cgroup_usage_pages > decision.limit_pages:  # hostd picks the pages, then holds the limit
                    actions.append((vm.vm_id, vm.host_target, "pageout",
                                    (vm.cgroup_usage_pages - decision.limit_pages) * PAGE_SIZE_BYTES))
                actions.append((vm.vm_id, vm.host_target, "limit", limit_bytes))
                self.counters["vswap_limit_changes"] += 1
                self._event(now_ms, "vswap", vm=vm.vm_id, old_limit_pages=old, new_limit_pages=decision.limit_pages,
                            swap_target_pages=vm.swap_target_pages, usage_pages=vm.cgroup_usage_pages,
                            reason=decision.reason)
            granted_now = max(0, vm.cgroup_usage_pages - vm.balloon_pages)
            # Only guests the host is paging out are frozen: one whose balloon can still cover
            # its gap keeps running, as freezing it would stop its balloon driver too.
            above = granted_now > vm.alloc_target_pages and vm.swap_target_pages > 0
            block_in = vswap.BlockInput(state=self.state, above_target=above,
                                        frozen_since_ms=vm.frozen_since_ms,
                                        cooldown_until_ms=vm.block_cooldown_until_ms)
            frozen, why = (vswap.block_decision(block_in, now_ms, self.config.block_max_ms)
                           if self.config.block_max_ms else (False, "blocking off"))
            if frozen and vm.frozen_since_ms is None:
                vm.frozen_since_ms = now_ms
                actions.append((vm.vm_id, vm.host_target, "freeze", None))
                self.counters["blocks"] += 1
                self._event(now_ms, "block", vm=vm.vm_id, reason=why)
            elif not frozen and vm.frozen_since_ms is not None:
                if now_ms - vm.frozen_since_ms >= self.config.block_max_ms:
                    vm.block_cooldown_until_ms = now_ms + self.config.block_max_ms
                vm.frozen_since_ms = None
                vm.last_seen_ms = max(vm.last_seen_ms, now_ms)  # its agent gets a full report window again
                actions.append((vm.vm_id, vm.host_target, "thaw", None))
                self._event(now_ms, "unblock", vm=vm.vm_id, reason=why)
        return actions

    def host_actions_succeeded(self, vm_ids: set[str]) -> None:
        for vm_id in vm_ids:
            if vm_id in self.vms:
                self.vms[vm_id].backend_error = None

    def host_action_failed(self, vm_id: str, action: str, detail: str, now_ms: int) -> None:
        vm = self.vms.get(vm_id)
        self.counters["host_action_failures"] += 1
        if vm is None or vm.backend_error != f"{action}: {detail}":  # an event per new failure, not per retry
            self._event(now_ms, "host_action_failed", vm=vm_id, action=action, detail=detail)
        if vm is not None:
            vm.backend_error = f"{action}: {detail}"
            if action == "freeze":
                vm.frozen_since_ms = None
            elif action == "limit":
                vm.vswap_limit_pages = vm.vswap_previous_limit_pages

    def _change_state(self, new_state: policy.State, now_ms: int) -> None:
        old = self.state
        self.state = new_state
        self._event(now_ms, "state", old=old, new=new_state, free_bytes=self.free_pages() * PAGE_SIZE_BYTES)
        log.info("free memory state %s → %s (free %d MiB)", old, new_state, self.free_pages() * PAGE_SIZE_BYTES >> 20)
        self._request_recompute(f"state {old} → {new_state}")

    def _request_recompute(self, trigger: str) -> None:
        """Joins, leaves and state changes recompute at the next tick (≤ 100 ms), once for all
        of them: 2,000 agents re-registering after a restart cost one recompute, not 2,000."""
        self._pending_triggers[trigger] = None

    # ---- policy -----------------------------------------------------------------------
    def recompute(self, now_ms: int, trigger: str) -> Outgoing:
        vms = [vm for vm in self.vms.values() if vm.alive]
        if not vms:
            return []
        inputs = [
            policy.VmInput(
                vm_id=vm.vm_id, memsz_pages=vm.memsz_pages, shares=vm.shares(),
                reservation_pages=vm.params.reservation_bytes // PAGE_SIZE_BYTES,
                limit_pages=vm.limit_pages, maxmemctl_pages=vm.maxmemctl_pages,
                active_ratio=vm.working_set.ratio, balloon_pages=vm.balloon_pages, agent_alive=vm.has_agent,
                agent_refusing=vm.refusing,
                manual_balloon_pages=vm.manual_balloon_pages, balloon_target_pages=vm.balloon_target_pages,
            )
            for vm in vms
        ]
        host = policy.HostInput(self.settings.host_memory_pages, self.settings.idle_tax_ratio,
                                self.settings.ctl_max_percent, self.settings.sliding_min_free)
        result = policy.compute_targets(host, inputs, self.state)
        self._last_result = result
        self._last_result_index = {vm.vm_id: index for index, vm in enumerate(vms)}
        self._reasons = {}
        self.last_recompute_ms = now_ms
        self.next_balance_ms = now_ms + self.settings.balance_period_ms
        out: Outgoing = []
        changed = 0
        for index, vm in enumerate(vms):
            new_target = int(result.balloon_target_pages[index])
            vm.alloc_target_pages = int(result.alloc_target_pages[index])
            vm.balloon_max_pages = int(result.balloon_max_pages[index])
            vm.swap_target_pages = int(result.swap_target_pages[index])
            vm.rho = float(result.rho[index])
            vm.active_pages = int(result.active_pages[index])
            if not vm.has_agent:  # nobody to balloon: the swap target carries it all
                vm.balloon_target_pages, vm.reason = 0, result.decision(index).reason
                continue
            if vm.adopted_awaiting_report or (new_target == vm.balloon_target_pages and vm.target_seq):
                continue
            decision = result.decision(index)
            old_target = vm.balloon_target_pages
            self._target_seq += 1
            vm.balloon_target_pages, vm.target_seq, vm.reason = new_target, self._target_seq, decision.reason
            out.append((vm.route, self._frame(SetTarget(target_pages=new_target, target_seq=vm.target_seq))))
            if new_target != old_target:
                self._event(now_ms, "target", vm=vm.vm_id, old_balloon_target_pages=old_target,
                            new_balloon_target_pages=new_target, alloc_target_pages=vm.alloc_target_pages,
                            swap_target_pages=vm.swap_target_pages,
                            rho=round(vm.rho, 6) if math.isfinite(vm.rho) else None,
                            active_pages=vm.active_pages, reason=decision.reason, trigger=trigger)
                changed += 1
                # The event log has every change; the text log the first few of a recompute.
                log.log(logging.INFO if changed <= LOGGED_TARGETS_PER_RECOMPUTE else logging.DEBUG,
                        "vm %s balloon target %d → %d pages (%s; %s)", vm.vm_id, old_target, new_target,
                        decision.reason, trigger)
        if changed > LOGGED_TARGETS_PER_RECOMPUTE:
            log.info("... and %d more balloon targets changed (%s; every one is in the event log)",
                     changed - LOGGED_TARGETS_PER_RECOMPUTE, trigger)
        return out

    def tick(self, now_ms: int) -> Outgoing:
        self._snapshot_cache = None
        out: Outgoing = []
        if not self._settled and now_ms >= self.settle_until_ms:
            self._settled = True
            waiting = [vm for vm in self.vms.values() if vm.adopted_awaiting_report and vm.status is not None]
            for vm in waiting:
                vm.adopted_awaiting_report = False
            if waiting:
                self._request_recompute("startup settled: adopted balloons handed to the policy")
        silent_limit = self.config.lost_after_reports * self.config.report_interval_ms
        # A frozen guest's agent is frozen too: its silence is ours, not a lost agent.
        lost = [vm for vm in self.vms.values() if vm.alive and vm.has_agent and vm.frozen_since_ms is None
                and now_ms - vm.last_seen_ms > silent_limit]
        for vm in lost:
            self._drop(vm, now_ms, "lost", f"silent for {now_ms - vm.last_seen_ms} ms")
        if lost:
            self._request_recompute(f"lost {', '.join(vm.vm_id for vm in lost)}")
        expired = [vm for vm in self.vms.values() if not vm.alive and vm.left_ms is not None
                   and now_ms - vm.left_ms >= self.config.dead_vm_ttl_ms]
        for vm in expired:
            self._forget(vm)
        new_state = policy.next_state(self.state, self.free_pages(), self.thresholds())
        if new_state != self.state:
            self._change_state(new_state, now_ms)
        if now_ms >= self.next_balance_ms:
            self._request_recompute("balance period")
        if self._pending_triggers:
            triggers = list(self._pending_triggers)
            self._pending_triggers = {}
            shown = triggers[:3] + ([f"+{len(triggers) - 3} more"] if len(triggers) > 3 else [])
            out += self.recompute(now_ms, "; ".join(shown))
        return out

    # ---- control plane ----------------------------------------------------------------
    def handle_control(self, frame: bytes, now_ms: int, operator: bool = False) -> tuple[bytes, Outgoing]:
        """The reply to balloonctl, and any frames to agents that the change caused.
        `operator`: the connection itself is an authority (a CURVE operator key, or an
        ipc:// socket whose file mode let only the owner in); else a change needs the token."""
        seq: int | None = None
        try:
            envelope = decode(frame, MAX_CONTROL_REQUEST_BYTES)
            message, seq = envelope.message, envelope.seq
            return self._dispatch_control(message, seq, now_ms, operator)
        except ProtocolError as exc:
            self.protocol_errors[exc.code.name] += 1
            return self._error(exc.code, exc.detail, seq), []
        except Exception:  # a bug: logged and answered, never the end of the daemon
            self.protocol_errors["INTERNAL"] += 1
            log.exception("internal error on a control request (%d bytes)", len(frame))
            return self._error(ErrorCode.INTERNAL, "internal error; see hostd's log", seq), []

    def _authorize(self, message: SetVmParams | SetHostParams | SetManualTarget, operator: bool) -> None:
        if operator:
            return
        token = message.control_token
        if self.control_token is None or token is None or not hmac.compare_digest(token, self.control_token):
            self.counters["control_refused"] += 1
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "changes need hostd's control token (balloonctl reads it "
                                "from /run/balloonlab/control.token, --token-file or BALLOONLAB_CONTROL_TOKEN_FILE)"
                                if self.control_token is not None else
                                "changes need an operator key (CURVE) or the ipc:// control socket; "
                                "hostd has no control token")

    def _dispatch_control(self, message: Message, seq: int, now_ms: int, operator: bool) -> tuple[bytes, Outgoing]:
        if message.plane != "control" or isinstance(message, StatusReply | ControlOk):
            raise ProtocolError(ErrorCode.UNEXPECTED_KIND, f"{message.kind} is not a control request")
        if isinstance(message, GetStatus):
            document = cast(dict[str, Any], self.cached_snapshot(now_ms))
            return self._frame(StatusReply(snapshot=document), seq, MAX_CONTROL_FRAME_BYTES), []
        if isinstance(message, SetVmParams):
            self._authorize(message, operator)
            detail, data = self._set_vm_params(message, now_ms)
            out = self.recompute(now_ms, f"{message.vm_id} settings changed")
        elif isinstance(message, SetHostParams):
            self._authorize(message, operator)
            detail, data = self._set_host_params(message, now_ms)
            out = self.recompute(now_ms, "host settings changed")
        elif isinstance(message, SetManualTarget):
            self._authorize(message, operator)
            detail, data = self._set_manual_target(message, now_ms)
            out = self.recompute(now_ms, f"{message.vm_id} manual target")
        else:
            raise ProtocolError(ErrorCode.UNEXPECTED_KIND, f"{message.kind} is not handled")
        self.settings_dirty = True
        self._snapshot_cache = None
        return self._frame(ControlOk(detail=detail, data=data), seq), out

    def _vm(self, vm_id: str) -> VmRecord:
        vm = self.vms.get(vm_id)
        if vm is None:
            raise ProtocolError(ErrorCode.UNKNOWN_VM, f"no vm {vm_id!r}; known: {sorted(self.vms)}")
        return vm

    def _set_vm_params(self, request: SetVmParams, now_ms: int) -> tuple[str, dict[str, Any]]:
        vm = self._vm(request.vm_id)
        memsz = vm.hello.memsz_bytes
        values: dict[str, Any] = {
            "shares": vm.params.shares, "reservation_bytes": vm.params.reservation_bytes,
            "limit_bytes": vm.params.limit_bytes, "maxmemctl_bytes": vm.params.maxmemctl_bytes,
        }
        defaults = VmDefaults()
        for key, value in request.params.items():
            values[key] = getattr(defaults, key) if value is None else value
        reservation = values["reservation_bytes"]
        limit = values["limit_bytes"]
        assert isinstance(reservation, int)
        if reservation > memsz:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"reservation {reservation >> 20} MiB exceeds memsz "
                                f"{memsz >> 20} MiB")
        if isinstance(limit, int) and limit > memsz:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"limit {limit >> 20} MiB exceeds memsz {memsz >> 20} MiB "
                                "(a vm never gets more than its memory size)")
        if isinstance(limit, int) and limit < reservation:
            raise ProtocolError(ErrorCode.INVALID_FIELD, "limit is below the reservation")
        refusal = policy.admission_check([self._reserved_pages(vm.vm_id)], reservation // PAGE_SIZE_BYTES,
                                         self.settings.host_memory_pages, self.settings.sliding_min_free)
        if refusal:
            raise ProtocolError(ErrorCode.ADMISSION_REFUSED, refusal)
        old = vm.params
        vm.params = VmDefaults(**values)
        self._reserved_alive_pages = None
        saved = self._vm_overrides.setdefault(vm.vm_id, {"params": {}, "manual_balloon_pages": None})
        saved["params"] = {**saved["params"], **request.params}
        changes = {k: (getattr(old, k), getattr(vm.params, k)) for k in request.params}
        detail = "; ".join(f"{k} {a} → {b}" for k, (a, b) in changes.items())
        self._event(now_ms, "vm_params", vm=vm.vm_id, changes={k: [a, b] for k, (a, b) in changes.items()})
        return f"{vm.vm_id}: {detail}", {k: b for k, (_a, b) in changes.items()}

    def _set_host_params(self, request: SetHostParams, now_ms: int) -> tuple[str, dict[str, Any]]:
        defaults = HostSettings.from_config(self.config)
        staged = dataclasses.replace(self.settings)  # all-or-nothing: apply only if every value passes
        changes: dict[str, tuple[Any, Any]] = {}
        for key, value in request.params.items():
            if key == "host_memory_bytes":
                pages = defaults.host_memory_pages if value is None else int(value) // PAGE_SIZE_BYTES
                if pages * PAGE_SIZE_BYTES < MIN_HOST_MEMORY_BYTES:
                    raise ProtocolError(ErrorCode.INVALID_FIELD, f"host_memory_bytes: at least "
                                        f"{MIN_HOST_MEMORY_BYTES >> 20} MiB (minFree alone is 6 % of it)")
                refusal = policy.admission_check([self._reserved_pages("")], 0, pages, staged.sliding_min_free)
                if refusal:
                    raise ProtocolError(ErrorCode.ADMISSION_REFUSED, f"host_memory_bytes: {refusal}")
                changes[key] = (staged.host_memory_pages * PAGE_SIZE_BYTES, pages * PAGE_SIZE_BYTES)
                staged.host_memory_pages = pages
            else:
                new_value = getattr(defaults, key) if value is None else value
                if key == "idle_tax_ratio":
                    new_value = float(new_value)
                changes[key] = (getattr(staged, key), new_value)
                setattr(staged, key, new_value)
        self.settings = staged
        for key, value in request.params.items():
            if value is None:
                self._host_overrides.pop(key, None)
            else:
                self._host_overrides[key] = value
        if "host_memory_bytes" in request.params:
            for vm in self.vms.values():
                vm.memsz_cap_pages = self._memsz_cap(vm)
        self._event(now_ms, "host_params", changes={k: [a, b] for k, (a, b) in changes.items()})
        log.info("host settings changed: %s", changes)
        detail = "; ".join(f"{k} {a} → {b}" for k, (a, b) in changes.items())
        return detail, {k: b for k, (_a, b) in changes.items()}

    def _set_manual_target(self, request: SetManualTarget, now_ms: int) -> tuple[str, dict[str, Any]]:
        vm = self._vm(request.vm_id)
        pages = request.balloon_target_pages
        if pages is not None and pages > vm.memsz_pages:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"balloon target {pages} pages exceeds memsz "
                                f"{vm.memsz_pages} pages")
        old = vm.manual_balloon_pages
        vm.manual_balloon_pages = pages
        saved = self._vm_overrides.setdefault(vm.vm_id, {"params": {}, "manual_balloon_pages": None})
        saved["manual_balloon_pages"] = pages
        self._event(now_ms, "manual_target", vm=vm.vm_id, old=old, new=pages)
        shown = "auto" if pages is None else f"{pages} pages"
        return f"{vm.vm_id}: balloon target {shown}", {"balloon_target_pages": pages}

    # ---- status -----------------------------------------------------------------------
    def _current_reason(self, vm: VmRecord) -> str:
        """Why the vm's targets are what they are, from the latest recompute."""
        index = self._last_result_index.get(vm.vm_id)
        if not vm.alive or index is None or self._last_result is None:
            return vm.reason
        reason = self._reasons.get(vm.vm_id)
        if reason is None:  # worked out once per recompute, not once per snapshot
            reason = self._reasons[vm.vm_id] = self._last_result.decision(index).reason
        return reason

    def cached_snapshot(self, now_ms: int) -> StatusDocument:
        """The status document for status requests: shared by the requests that arrive between
        two agent frames or ticks (at most SNAPSHOT_REUSE_MS apart). Its cost grows with the vm
        table, and many clients polling at once must not multiply it."""
        cached = self._snapshot_cache
        if cached is not None and 0 <= now_ms - cached[0] < SNAPSHOT_REUSE_MS:
            return cached[1]
        document = self.snapshot(now_ms)
        self._snapshot_cache = (now_ms, document)
        return document

    def snapshot(self, now_ms: int) -> StatusDocument:
        limits = self.thresholds()
        page = PAGE_SIZE_BYTES
        vms: list[VmStatus] = []
        departed: list[DepartedVm] = []
        for vm in sorted(self.vms.values(), key=lambda v: v.vm_id):
            if not vm.alive:  # listed apart until dead_vm_ttl_ms forgets them
                departed.append({"vm_id": vm.vm_id, "reason": vm.left_reason,
                                 "left_ms_ago": None if vm.left_ms is None else now_ms - vm.left_ms})
                continue
            stats = vm.stats()
            ws = vm.working_set
            vms.append({
                "vm_id": vm.vm_id,
                "alive": vm.alive,
                "agent_state": vm.status.agent_state if vm.status else ("joined" if vm.has_agent else "no_agent"),
                "page_kind": vm.hello.page_kind,
                "cgroup_version": vm.hello.cgroup_version,
                "last_seen_ms_ago": now_ms - vm.last_seen_ms,
                "memsz_bytes": vm.memsz_pages * page,
                "claimed_memsz_bytes": vm.hello.memsz_bytes,
                "consumed_bytes": vm.consumed_pages * page,
                "granted_bytes": vm.granted_pages * page,
                "alloc_target_bytes": vm.alloc_target_pages * page,
                "active_bytes": vm.active_pages * page,
                "touched_ratio": vm.status.ws_touched_ratio if vm.status else None,
                "active_ratio": ws.ratio,
                "active_slow_ratio": ws.slow,
                "active_fast_ratio": ws.fast,
                "active_fast_current_ratio": ws.fast_current,
                "ws_method": vm.status.ws_method if vm.status else None,
                "balloon_bytes": vm.balloon_pages * page,
                "ledger_bytes": self.ledger.held_pages(vm.vm_id) * page,
                "balloon_target_bytes": vm.balloon_target_pages * page,
                "balloon_max_bytes": vm.balloon_max_pages * page,
                "manual_balloon_target_bytes": None if vm.manual_balloon_pages is None
                else vm.manual_balloon_pages * page,
                "swap_current_bytes": int_stat(stats.get("swap_used_bytes"))
                if vm.has_agent or vm.cgroup_swap_pages is None else vm.cgroup_swap_pages * page,
                "has_agent": vm.has_agent,
                "host_target": vm.host_target,
                "cgroup_limit_bytes": None if vm.cgroup_limit_pages is None else vm.cgroup_limit_pages * page,
                "vswap_limit_bytes": None if vm.vswap_limit_pages is None else vm.vswap_limit_pages * page,
                "vswap_reason": vm.vswap_reason,
                "frozen": vm.frozen_since_ms is not None,
                "backend_error": vm.backend_error,
                "swap_target_bytes": vm.swap_target_pages * page,
                "swap_in_pages": int_stat(stats.get("swap_in_pages")),
                "swap_out_pages": int_stat(stats.get("swap_out_pages")),
                "major_faults": int_stat(stats.get("major_faults")),
                "shares": vm.shares(),
                "shares_setting": vm.params.shares,
                "reservation_bytes": vm.params.reservation_bytes,
                "limit_bytes": vm.params.limit_bytes,
                "maxmemctl_bytes": vm.params.maxmemctl_bytes,
                "rho": vm.rho if math.isfinite(vm.rho) else None,  # infinite when allocated nothing
                "reason": self._current_reason(vm),
                "refused_pages": vm.refused_pages,
                "inflated_pages": vm.locked_pages,
                "deflated_pages": vm.unlocked_pages,
                "lock_batches": vm.lock_batches,
                "unlock_batches": vm.unlock_batches,
                "resets": vm.resets,
                "workload": {k.removeprefix("workload_"): v for k, v in stats.items() if k.startswith("workload_")},
            })
        return {
            "host": {
                "session_id": self.session_id,
                "uptime_ms": now_ms - self.started_ms,
                "state": self.state,
                "free_bytes": self.free_pages() * page,
                "granted_bytes": self._granted_total * page,
                "thresholds_bytes": {"high": limits.high * page, "soft": limits.soft * page,
                                     "hard": limits.hard * page, "low": limits.low * page},
                "host_memory_bytes": self.settings.host_memory_pages * page,
                "idle_tax_ratio": self.settings.idle_tax_ratio,
                "ctl_max_percent": self.settings.ctl_max_percent,
                "sample_period_ms": self.settings.sample_period_ms,
                "balance_period_ms": self.settings.balance_period_ms,
                "sliding_min_free": self.settings.sliding_min_free,
                "report_interval_ms": self.config.report_interval_ms,
                "vms_alive": sum(vm.alive for vm in self.vms.values()),
                "protocol_errors": dict(self.protocol_errors),
                "counters": dict(self.counters),
            },
            "vms": vms,
            "departed": departed,
        }
