"""Every message kind of the protocol (version in protocol.limits): one frozen dataclass each, validated on creation.

Each class docstring is the message's spec: direction, body fields with units, and the reply.
Bodies are msgpack maps whose keys are exactly the dataclass field names (unknown or missing
keys are refused). Field types are checked from the annotations by `protocol.codec`; bounds
and cross-field rules are checked in `__post_init__`, so a message that exists is valid.

Planes: "agent" kinds travel on hostd's agent ROUTER; "control" kinds on its control
endpoint (used by balloonctl). A kind sent on the wrong plane gets UNEXPECTED_KIND.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar, Literal

from protocol.errors import ErrorCode, ProtocolError
from protocol.limits import (
    MAX_INTERVAL_MS,
    MAX_KEY_CHARS,
    MAX_MAP_ENTRIES,
    MAX_MEMSZ_BYTES,
    MAX_PAGE_NUMBER,
    MAX_PAGES,
    MAX_PAGES_PER_MESSAGE,
    MAX_SECRET_CHARS,
    MAX_SEQ,
    MAX_SNAPSHOT_DEPTH,
    MAX_SNAPSHOT_ITEMS,
    MAX_TEXT_CHARS,
    MAX_VM_ID_CHARS,
    PAGE_SIZE_BYTES,
)
from protocol.pages import PageRanges

Scalar = int | float | str | bool | None
PlainData = Any  # nested maps/lists of scalars, validated by check_plain_data

_VM_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SECRET_PATTERN = re.compile(r"[A-Za-z0-9_-]+")

VM_PARAM_KEYS = frozenset({"shares", "reservation_bytes", "limit_bytes", "maxmemctl_bytes"})
HOST_PARAM_KEYS = frozenset(
    {
        "idle_tax_ratio",
        "sample_period_ms",
        "balance_period_ms",
        "host_memory_bytes",
        "ctl_max_percent",
    }
)
SHARE_LEVELS = ("low", "normal", "high")
AGENT_STATES = ("idle", "inflating", "deflating", "refusing", "pressure_deflate", "host_lost")
WsMethod = Literal["referenced", "active_lru", "none"]
WS_METHODS: tuple[WsMethod, ...] = ("referenced", "active_lru", "none")


def _invalid(detail: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_FIELD, detail)


def _check_range(name: str, value: int | float, low: int | float, high: int | float) -> None:
    if not low <= value <= high:
        raise _invalid(f"{name}={value} outside {low}..{high}")


def check_vm_id(vm_id: str) -> None:
    if not 1 <= len(vm_id) <= MAX_VM_ID_CHARS or not _VM_ID_PATTERN.fullmatch(vm_id):
        raise _invalid(
            f"vm_id {vm_id[:80]!r} must be 1..{MAX_VM_ID_CHARS} chars of letters, digits, '_', '.', '-'"
        )


def check_secret(name: str, value: str) -> None:
    if not 16 <= len(value) <= MAX_SECRET_CHARS or not _SECRET_PATTERN.fullmatch(value):
        raise _invalid(f"{name} must be 16..{MAX_SECRET_CHARS} chars of letters, digits, '_', '-'")


def check_plain_data(value: Any, depth: int = 0, budget: list[int] | None = None) -> None:
    """Nested maps (str keys) and lists of scalars, bounded in depth and total size."""
    budget = [MAX_SNAPSHOT_ITEMS] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, "snapshot has too many items")
    if depth > MAX_SNAPSHOT_DEPTH:
        raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, "snapshot nested too deeply")
    if value is None or isinstance(value, bool | int | str):
        if isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
            raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, "snapshot string too long")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _invalid("snapshot has a non-finite number")
        return
    if isinstance(value, list | tuple):
        for item in value:
            check_plain_data(item, depth + 1, budget)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or len(key) > MAX_KEY_CHARS:
                raise _invalid("snapshot keys must be short strings")
            check_plain_data(item, depth + 1, budget)
        return
    raise _invalid(f"snapshot holds a {type(value).__name__}")


StatValue = int | float | None


def check_stats_keys(keys: tuple[str, ...]) -> None:
    if len(keys) > MAX_MAP_ENTRIES:
        raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, f"stats_keys: more than {MAX_MAP_ENTRIES} names")
    if any(not 1 <= len(key) <= MAX_KEY_CHARS for key in keys):
        raise _invalid(f"stats_keys: names must be 1..{MAX_KEY_CHARS} chars")
    if len(set(keys)) != len(keys):
        raise _invalid("stats_keys: names must be unique")


def stats_values(keys: tuple[str, ...], stats: dict[str, StatValue]) -> tuple[StatValue, ...]:
    """A status's `stats` array for the hello's `stats_keys` (absent names are None = unknown)."""
    return tuple(stats.get(key) for key in keys)


def stats_map(keys: tuple[str, ...], values: tuple[StatValue, ...]) -> dict[str, StatValue]:
    """The names back on a status's `stats` array."""
    return dict(zip(keys, values, strict=True))


class RangeStatus(IntEnum):
    """Per-range answer to lock/unlock (vmw_balloon answers per entry)."""

    OK = 0  # lock: now in the host's ledger; unlock: removed from it
    DUPLICATE = 1  # lock: already in this vm's ledger (or another vm's)
    INVALID = 2  # outside the page space the agent declared (e.g. beyond its memsz for PFNs)
    REFUSED = 3  # host declines (balloon at target/max); agent keeps it ≤ 1 cycle then frees it
    UNKNOWN = 4  # unlock: the page is not in this vm's ledger


@dataclass(frozen=True, slots=True)
class RangeResult:
    """One (start, count) range of a lock/unlock batch and its status. Wire: [start, count, status]."""

    start: int
    count: int
    status: RangeStatus

    def __post_init__(self) -> None:
        _check_range("start", self.start, 0, MAX_PAGE_NUMBER - 1)
        _check_range("count", self.count, 1, MAX_PAGES_PER_MESSAGE)


class Message:
    """Base of all kinds. `kind` is the wire name, `plane` the endpoint it belongs to."""

    __slots__ = ()
    kind: ClassVar[str]
    plane: ClassVar[Literal["agent", "control"]]


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
    """agent → host: leaving (after deflating). The host drops the vm at once. Reply: none."""

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


# ---------------------------------------------------------------------------------------
# Control plane (balloonctl ↔ hostd)
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class GetStatus(Message):
    """ctl → host: ask for the full status snapshot. Reply: status_reply."""

    kind: ClassVar[str] = "get_status"
    plane: ClassVar[Literal["agent", "control"]] = "control"


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusReply(Message):
    """host → ctl: `snapshot` is the document `balloonctl status --json` prints (fields in
    the top-level README). Bounded nested plain data."""

    kind: ClassVar[str] = "status_reply"
    plane: ClassVar[Literal["agent", "control"]] = "control"
    snapshot: dict[str, PlainData]

    def __post_init__(self) -> None:
        check_plain_data(self.snapshot)


def _check_params(params: dict[str, Scalar], allowed: frozenset[str]) -> None:
    if not params:
        raise _invalid("no parameters given")
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise _invalid(f"unknown parameter(s) {unknown}; known: {sorted(allowed)}")


@dataclass(frozen=True, slots=True, kw_only=True)
class SetVmParams(Message):
    """ctl → host: change a vm's shares (int ≥ 0 or "low"/"normal"/"high"), reservation_bytes,
    limit_bytes, maxmemctl_bytes; None resets a key to its default. All-or-nothing: an invalid
    value changes nothing. Needs authority (control_token, unless the connection is an
    operator's: protocol/README.md). Reply: control_ok or error."""

    kind: ClassVar[str] = "set_vm_params"
    plane: ClassVar[Literal["agent", "control"]] = "control"
    vm_id: str
    params: dict[str, Scalar]
    control_token: str | None = None

    def __post_init__(self) -> None:
        check_vm_id(self.vm_id)
        if self.control_token is not None:
            check_secret("control_token", self.control_token)
        _check_params(self.params, VM_PARAM_KEYS)
        for key, value in self.params.items():
            if value is None:
                continue
            if key == "shares":
                if isinstance(value, str):
                    if value not in SHARE_LEVELS:
                        raise _invalid(f"shares {value!r} not one of {SHARE_LEVELS} or an integer")
                    continue
                if not isinstance(value, int) or isinstance(value, bool):
                    raise _invalid("shares must be an integer or low/normal/high")
                _check_range("shares", value, 0, 1 << 40)
            else:
                if not isinstance(value, int) or isinstance(value, bool):
                    raise _invalid(f"{key} must be an integer number of bytes")
                _check_range(key, value, 0, MAX_MEMSZ_BYTES)


@dataclass(frozen=True, slots=True, kw_only=True)
class SetHostParams(Message):
    """ctl → host (needs authority): change idle_tax_ratio (0 ≤ τ < 1), sample_period_ms, balance_period_ms,
    host_memory_bytes, ctl_max_percent (0..99). None resets to default. Reply: control_ok."""

    kind: ClassVar[str] = "set_host_params"
    plane: ClassVar[Literal["agent", "control"]] = "control"
    params: dict[str, Scalar]
    control_token: str | None = None

    def __post_init__(self) -> None:
        _check_params(self.params, HOST_PARAM_KEYS)
        if self.control_token is not None:
            check_secret("control_token", self.control_token)
        for key, value in self.params.items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise _invalid(f"{key} must be a number")
            if key == "idle_tax_ratio":
                if not 0.0 <= value < 1.0:
                    raise _invalid(f"idle_tax_ratio={value} must satisfy 0 ≤ τ < 1")
            elif not isinstance(value, int):
                raise _invalid(f"{key} must be an integer")
            elif key == "ctl_max_percent":
                _check_range(key, value, 0, 99)
            elif key.endswith("_ms"):
                _check_range(key, value, 10, MAX_INTERVAL_MS)
            else:
                _check_range(key, value, PAGE_SIZE_BYTES, MAX_MEMSZ_BYTES)


@dataclass(frozen=True, slots=True, kw_only=True)
class SetManualTarget(Message):
    """ctl → host (needs authority): pin vm's balloon target to `balloon_target_pages` (like `virsh setmem`
    pins a guest's size), or None to return to automatic targets. Reply: control_ok."""

    kind: ClassVar[str] = "set_manual_target"
    plane: ClassVar[Literal["agent", "control"]] = "control"
    vm_id: str
    balloon_target_pages: int | None
    control_token: str | None = None

    def __post_init__(self) -> None:
        check_vm_id(self.vm_id)
        if self.control_token is not None:
            check_secret("control_token", self.control_token)
        if self.balloon_target_pages is not None:
            _check_range("balloon_target_pages", self.balloon_target_pages, 0, MAX_PAGES)


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlOk(Message):
    """host → ctl: the request was applied. detail: what changed. data: the new values."""

    kind: ClassVar[str] = "control_ok"
    plane: ClassVar[Literal["agent", "control"]] = "control"
    detail: str
    data: dict[str, PlainData]

    def __post_init__(self) -> None:
        check_plain_data(self.data)


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
