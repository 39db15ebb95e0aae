"""The control plane's message kinds (balloonctl ↔ hostd's control endpoint): status, and the
changes that need authority. Specs as in protocol/messages.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from protocol.limits import (
    MAX_INTERVAL_MS,
    MAX_MEMSZ_BYTES,
    MAX_PAGES,
    PAGE_SIZE_BYTES,
)
from protocol.message_base import (
    HOST_PARAM_KEYS,
    SHARE_LEVELS,
    VM_PARAM_KEYS,
    Message,
    PlainData,
    Scalar,
    _check_range,
    _invalid,
    check_plain_data,
    check_secret,
    check_vm_id,
)


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
