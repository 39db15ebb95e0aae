"""Every message kind of the protocol (version in protocol.limits): one frozen dataclass each, validated on creation.

Each class docstring is the message's spec: direction, body fields with units, and the reply.
Bodies are msgpack maps whose keys are exactly the dataclass field names (unknown or missing
keys are refused). Field types are checked from the annotations by `protocol.codec`; bounds
and cross-field rules are checked in `__post_init__`, so a message that exists is valid.

Planes: "agent" kinds travel on hostd's agent ROUTER (this module); "control" kinds on its
control endpoint (used by balloonctl; protocol/control_messages.py). A kind sent on the wrong
plane gets UNEXPECTED_KIND. The base and the field validators are in protocol/message_base.py;
every name stays importable from here, and KINDS maps each wire name to its class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from protocol.control_messages import (
    ControlOk,
    GetStatus,
    SetHostParams,
    SetManualTarget,
    SetVmParams,
    StatusReply,
)
from protocol.errors import ErrorCode, ProtocolError
from protocol.limits import (
    MAX_INTERVAL_MS,
    MAX_MAP_ENTRIES,
    MAX_MEMSZ_BYTES,
    MAX_PAGES,
    MAX_PAGES_PER_MESSAGE,
    MAX_SEQ,
    MAX_VM_ID_CHARS,
    PAGE_SIZE_BYTES,
)
from protocol.message_base import (
    AGENT_STATES,
    HOST_PARAM_KEYS,
    SHARE_LEVELS,
    VM_PARAM_KEYS,
    WS_METHODS,
    Message,
    PlainData,
    RangeResult,
    RangeStatus,
    Scalar,
    StatValue,
    WsMethod,
    _check_range,
    _invalid,
    check_plain_data,
    check_secret,
    check_stats_keys,
    check_vm_id,
    stats_map,
    stats_values,
)
from protocol.pages import PageRanges


# ---------------------------------------------------------------------------------------
# Agent plane
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class Hello(Message):
    """agent → host, first message and after every reconnect.

    vm_id: unique per host (a claim: hostd binds it to this connection at welcome). memsz_bytes: the guest's memory
    (its cgroup limit). page_kind: "pfn" (real frame numbers, CAP_SYS_ADMIN) or "vpn"
    (virtual page numbers of the agent). supports_2m: can pin 2 MiB THP batches.
    cgroup_version: 1, 2, or 0 when unknown. max_batch_pages: largest lock batch it sends.
    held_pages: balloon it already holds (non-zero after a host restart: it will re-report
    those pages with `lock(adopt=True)` instead of inflating again). last_host_session_id:
    the session it was registered with before, or None. stats_keys: the names of the values
    every `status.stats` array carries, in order (declared once here: names in every status
    made the status map most of the host's decoding cost). vm_secret: the secret the last
    welcome of `last_host_session_id` gave this vm, or None; a hello for a vm that a live
    agent holds is accepted only with that secret (a reconnect of the same agent), every
    other claim gets CONFLICT.
    Reply: welcome, or error (CONFLICT, ADMISSION_REFUSED, UNAUTHORIZED, INVALID_FIELD).
    """

    kind: ClassVar[str] = "hello"
    plane: ClassVar[Literal["agent", "control"]] = "agent"
    vm_id: str
    memsz_bytes: int
    agent_version: str
    page_kind: Literal["pfn", "vpn"]
    supports_2m: bool
    cgroup_version: int
    max_batch_pages: int
    held_pages: int
    last_host_session_id: str | None
    stats_keys: tuple[str, ...]
    vm_secret: str | None = None

    def __post_init__(self) -> None:
        check_vm_id(self.vm_id)
        if self.vm_secret is not None:
            check_secret("vm_secret", self.vm_secret)
        check_stats_keys(self.stats_keys)
        _check_range("memsz_bytes", self.memsz_bytes, PAGE_SIZE_BYTES, MAX_MEMSZ_BYTES)
        if self.memsz_bytes % PAGE_SIZE_BYTES:
            raise _invalid(f"memsz_bytes={self.memsz_bytes} is not a multiple of {PAGE_SIZE_BYTES}")
        _check_range("cgroup_version", self.cgroup_version, 0, 2)
        _check_range("max_batch_pages", self.max_batch_pages, 1, MAX_PAGES_PER_MESSAGE)
        _check_range("held_pages", self.held_pages, 0, self.memsz_bytes // PAGE_SIZE_BYTES)


@dataclass(frozen=True, slots=True, kw_only=True)
class Welcome(Message):
    """host → agent, the answer to hello.

    host_session_id: changes each time hostd starts (agents detect a new host by it).
    report_interval_ms: how often to send status. host_timeout_ms: the ZMTP heartbeat interval
    and timeout of the agent's connection; a host unreachable this long is gone (re-hello), and
    a request unanswered for twice this long expires. batch_limit_pages: max pages per lock/unlock.
    sample_period_ms: the host's working-set sampling period (Mem.SamplePeriod): the agent
    samples at it (raised to its floor); None: the host sets none and the agent keeps its own.
    Changes later arrive in `settings`. reclaim: once a lock is OK, the agent hands the
    batch's memory back (munlock + MADV_DONTNEED) and keeps its pages in the balloon; the host
    lowers the guest's limit by the balloon. Fixed for the registration.
    vm_secret: a fresh random secret for this registration: the agent presents it in its
    next hello (after a reconnect) to show it is the same agent. Only this agent's
    connection ever sees it; it appears in no status output.
    Reply: none.
    """

    kind: ClassVar[str] = "welcome"
    plane: ClassVar[Literal["agent", "control"]] = "agent"
    host_session_id: str
    report_interval_ms: int
    host_timeout_ms: int
    batch_limit_pages: int
    sample_period_ms: int | None
    reclaim: bool
    vm_secret: str

    def __post_init__(self) -> None:
        if not 1 <= len(self.host_session_id) <= MAX_VM_ID_CHARS:
            raise _invalid("host_session_id must be 1..64 chars")
        check_secret("vm_secret", self.vm_secret)
        _check_range("report_interval_ms", self.report_interval_ms, 10, MAX_INTERVAL_MS)
        _check_range("host_timeout_ms", self.host_timeout_ms, 10, MAX_INTERVAL_MS)
        _check_range("batch_limit_pages", self.batch_limit_pages, 1, MAX_PAGES_PER_MESSAGE)
        if self.sample_period_ms is not None:
            _check_range("sample_period_ms", self.sample_period_ms, 10, MAX_INTERVAL_MS)


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings(Message):
    """host → agent, whenever a host setting the agent acts on changes (`balloonctl host
    sample_period=...`): sent to every registered agent, which applies it at once as it would
    a welcome's. sample_period_ms: the new working-set sampling period (the running period
    ends at the latest one new period from now). Reply: none.
    """

    kind: ClassVar[str] = "settings"
    plane: ClassVar[Literal["agent", "control"]] = "agent"
    sample_period_ms: int

    def __post_init__(self) -> None:
        _check_range("sample_period_ms", self.sample_period_ms, 10, MAX_INTERVAL_MS)


@dataclass(frozen=True, slots=True, kw_only=True)
class SetTarget(Message):
    """host → agent: the balloon should hold `target_pages` 4 KiB pages (MCTLTGT).

    target_seq increases with every new target of this host session; the agent acknowledges
    it in status.acked_target_seq once it has started moving. Reply: none.
    """

    kind: ClassVar[str] = "set_target"
    plane: ClassVar[Literal["agent", "control"]] = "agent"
    target_pages: int
    target_seq: int

    def __post_init__(self) -> None:
        _check_range("target_pages", self.target_pages, 0, MAX_PAGES)
        _check_range("target_seq", self.target_seq, 0, MAX_SEQ)


@dataclass(frozen=True, slots=True, kw_only=True)
class Lock(Message):
    """agent → host: these pages are now pinned in the balloon; add them to the ledger.

    pages: range-coded page numbers (of the kind declared at hello), ≤ batch_limit_pages.
    adopt: the pages were pinned before this session (host restart): duplicates of this vm's
    own ledger count as OK. Reply: lock_result (same seq).
    """

    kind: ClassVar[str] = "lock"
    plane: ClassVar[Literal["agent", "control"]] = "agent"
    pages: PageRanges
    adopt: bool

    def __post_init__(self) -> None:
        if not self.pages:
            raise _invalid("lock carries no pages")


@dataclass(frozen=True, slots=True, kw_only=True)
class Unlock(Message):
    """agent → host: the agent wants to release these pages. Reply: unlock_result (same seq).

    The agent frees only the ranges answered OK (as vmw_balloon does) — except that on
    guest pressure it frees first and reports after, since the guest's life comes first.
    """

    kind: ClassVar[str] = "unlock"
    plane: ClassVar[Literal["agent", "control"]] = "agent"
    pages: PageRanges

    def __post_init__(self) -> None:
        if not self.pages:
            raise _invalid("unlock carries no pages")


@dataclass(frozen=True, slots=True, kw_only=True)
class _RangeResults(Message):
    """Shared body of lock_result and unlock_result."""

    results: tuple[RangeResult, ...]
    target_pages: int
    target_seq: int

    def __post_init__(self) -> None:
        total = sum(r.count for r in self.results)
        if total > MAX_PAGES_PER_MESSAGE:
            raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, f"{total} pages answered in one result")
        _check_range("target_pages", self.target_pages, 0, MAX_PAGES)
        _check_range("target_seq", self.target_seq, 0, MAX_SEQ)


@dataclass(frozen=True, slots=True, kw_only=True)
class LockResult(_RangeResults):
    """host → agent: one status per range of the lock. Carries the current target too
    (vmw_balloon returns the target with every lock reply), so inflation stops promptly."""

    kind: ClassVar[str] = "lock_result"
    plane: ClassVar[Literal["agent", "control"]] = "agent"


@dataclass(frozen=True, slots=True, kw_only=True)
class UnlockResult(_RangeResults):
    """host → agent: one status per range of the unlock, plus the current target."""

    kind: ClassVar[str] = "unlock_result"
    plane: ClassVar[Literal["agent", "control"]] = "agent"


@dataclass(frozen=True, slots=True, kw_only=True)
class Status(Message):
    """agent → host, every report interval (default 1 s); also serves as heartbeat.

    What the host's policy reads is typed:
    balloon_pages: pages pinned now (MCTLSZ). acked_target_seq: newest target acted on.
    refused_pages: pages the guest could not give (no-OOM guard) or the host refused since the
    target was set; agent_state: one of AGENT_STATES ("refusing": it declines to inflate).
    usage_bytes: the guest's memory usage (its cgroup's memory.current; the balloon's pinned
    pages included), None before the first reading; ≤ 2^50 on the wire, capped at memsz by the
    host. ws_touched_ratio: fraction of the guest's memory touched during the last completed
    sampling period, None before the first; ws_samples: completed periods so far (the host
    averages each period once); ws_current_ratio: the running period so far, None when unknown;
    ws_method: how they were measured (one of WS_METHODS).
    stats: informational guest statistics (shown, logged, never acted on), one value per name
    of the hello's `stats_keys`, in that order (names in protocol/README.md); None = unknown
    (never 0 for unknown). A host refuses a status whose array does not match (INVALID_FIELD).
    Reply: none.
    """

    kind: ClassVar[str] = "status"
    plane: ClassVar[Literal["agent", "control"]] = "agent"
    balloon_pages: int
    acked_target_seq: int
    refused_pages: int
    agent_state: str
    usage_bytes: int | None
    ws_touched_ratio: float | None
    ws_samples: int
    ws_current_ratio: float | None
    ws_method: WsMethod
    stats: tuple[int | float | None, ...]

    def __post_init__(self) -> None:
        # An honest status (2,000 a second on a big host) passes in one chained test, in the
        # order of the checks below; anything else goes through them one by one, which name
        # the field (the same error, or the same TypeError at the same field, as before).
        if (0 <= self.balloon_pages <= MAX_PAGES and 0 <= self.acked_target_seq <= MAX_SEQ
                and 0 <= self.refused_pages <= MAX_PAGES and len(self.stats) <= MAX_MAP_ENTRIES
                and self.agent_state in AGENT_STATES
                and (self.usage_bytes is None or 0 <= self.usage_bytes <= MAX_MEMSZ_BYTES)
                and (self.ws_touched_ratio is None or 0.0 <= self.ws_touched_ratio <= 1.0)
                and 0 <= self.ws_samples <= MAX_SEQ
                and (self.ws_current_ratio is None or 0.0 <= self.ws_current_ratio <= 1.0)
                and self.ws_method in WS_METHODS):
            return
        _check_range("balloon_pages", self.balloon_pages, 0, MAX_PAGES)
        _check_range("acked_target_seq", self.acked_target_seq, 0, MAX_SEQ)
        _check_range("refused_pages", self.refused_pages, 0, MAX_PAGES)
        if len(self.stats) > MAX_MAP_ENTRIES:
            raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, f"stats: more than {MAX_MAP_ENTRIES} values")
        if self.agent_state not in AGENT_STATES:
            raise _invalid(f"agent_state {self.agent_state!r} not one of {AGENT_STATES}")
        if self.usage_bytes is not None:
            _check_range("usage_bytes", self.usage_bytes, 0, MAX_MEMSZ_BYTES)
        if self.ws_touched_ratio is not None:
            _check_range("ws_touched_ratio", self.ws_touched_ratio, 0.0, 1.0)
        _check_range("ws_samples", self.ws_samples, 0, MAX_SEQ)
        if self.ws_current_ratio is not None:
            _check_range("ws_current_ratio", self.ws_current_ratio, 0.0, 1.0)
        if self.ws_method not in WS_METHODS:
            raise _invalid(f"ws_method {str(self.ws_method)[:40]!r} not one of {WS_METHODS}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat(Message):
    """either way: "I am alive" when nothing else was sent for a while. Reply: none."""

    kind: ClassVar[str] = "heartbeat"
    plane: ClassVar[Literal["agent", "control"]] = "agent"


@dataclass(frozen=True, slots=True, kw_only=True)
class Bye(Message):
    """agent → host: leaving (after deflating). The host drops the vm at once. Reply: a bye
    (host → agent, reason "dropped"), which tells the agent its bye was read: libzmq discards what
    the host had received but not yet read when the connection closes, so an agent that closed
    right after sending could leave unseen and stay registered until its reports were missed.
    """

    kind: ClassVar[str] = "bye"
    plane: ClassVar[Literal["agent", "control"]] = "agent"
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Error(Message):
    """either way, on both planes: a request or frame was refused.

    code: an ErrorCode number. detail: a sentence. in_reply_to: the seq of the offending
    message, or None when the frame could not be decoded far enough to know it.
    """

    kind: ClassVar[str] = "error"
    plane: ClassVar[Literal["agent", "control"]] = "agent"
    code: int
    detail: str
    in_reply_to: int | None

    def __post_init__(self) -> None:
        _check_range("code", self.code, 1, 999)
        if self.in_reply_to is not None:
            _check_range("in_reply_to", self.in_reply_to, 0, MAX_SEQ)


KINDS: dict[str, type[Message]] = {
    cls.kind: cls
    for cls in (
        Hello,
        Welcome,
        Settings,
        SetTarget,
        Lock,
        Unlock,
        LockResult,
        UnlockResult,
        Status,
        Heartbeat,
        Bye,
        Error,
        GetStatus,
        StatusReply,
        SetVmParams,
        SetHostParams,
        SetManualTarget,
        ControlOk,
    )
}

__all__ = [  # the base's and the control plane's names stay importable from here
    "AGENT_STATES", "HOST_PARAM_KEYS", "KINDS", "SHARE_LEVELS", "VM_PARAM_KEYS", "WS_METHODS", "Bye",
    "ControlOk", "Error", "GetStatus", "Heartbeat", "Hello", "Lock", "LockResult", "Message", "PlainData",
    "RangeResult", "RangeStatus", "Scalar", "SetHostParams", "SetManualTarget", "SetTarget", "SetVmParams",
    "Settings", "StatValue", "Status", "StatusReply", "Unlock", "UnlockResult", "Welcome", "WsMethod",
    "check_plain_data", "check_secret", "check_stats_keys", "check_vm_id", "stats_map", "stats_values",
]
