"""What every message kind is built from: the Message base, field validators (vm ids,
secrets, ranges, nested plain data, the stats array), the enumerations of the wire
(agent states, share levels, parameter keys) and the per-range lock results."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar, Literal

from protocol.errors import ErrorCode, ProtocolError
from protocol.limits import (
    MAX_KEY_CHARS,
    MAX_MAP_ENTRIES,
    MAX_PAGE_NUMBER,
    MAX_PAGES_PER_MESSAGE,
    MAX_SECRET_CHARS,
    MAX_SNAPSHOT_DEPTH,
    MAX_SNAPSHOT_ITEMS,
    MAX_TEXT_CHARS,
    MAX_VM_ID_CHARS,
)

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
