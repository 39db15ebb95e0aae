"""The wire boundary: the only module that imports msgpack (protocol.fast_status, its
compiled shortcut for `status` frames, imports msgspec).

    encode(message, seq) -> bytes      one ZeroMQ frame
    decode(frame) -> Envelope          or ProtocolError, never any other exception

Frame = msgpack map {"v": 1, "kind": str, "seq": int, "body": map}. Body keys are exactly
the message's dataclass fields; their types are checked against the annotations here and
their bounds by the message itself.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Literal, Union, get_args, get_origin

import msgpack

from protocol.errors import ErrorCode, ProtocolError
from protocol.fast_status import decode_status
from protocol.limits import (
    MAX_FRAME_BYTES,
    MAX_KEY_CHARS,
    MAX_MAP_ENTRIES,
    MAX_RANGES_PER_MESSAGE,
    MAX_SEQ,
    MAX_TEXT_CHARS,
    PROTOCOL_VERSION,
)
from protocol.messages import KINDS, Message, PlainData, RangeResult, RangeStatus
from protocol.pages import PageRanges

_ENVELOPE_KEYS = frozenset({"v", "kind", "seq", "body"})


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded frame: the sender's sequence number and the validated message."""

    seq: int
    message: Message


def encode(message: Message, seq: int, max_frame_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """One frame for `message`. Raises ProtocolError if it would exceed `max_frame_bytes`
    (MAX_FRAME_BYTES on the agent plane, MAX_CONTROL_FRAME_BYTES on the control plane)."""
    if not 0 <= seq <= MAX_SEQ:
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"seq={seq} outside 0..{MAX_SEQ}")
    body = {f.name: _to_wire(getattr(message, f.name)) for f in fields(message)}  # type: ignore[arg-type]
    frame: bytes = msgpack.packb(
        {"v": PROTOCOL_VERSION, "kind": message.kind, "seq": seq, "body": body}, use_bin_type=True
    )
    if len(frame) > max_frame_bytes:
        raise ProtocolError(
            ErrorCode.TOO_LARGE, f"{message.kind} frame is {len(frame)} bytes (limit {max_frame_bytes})"
        )
    return frame


def decode(frame: bytes, max_frame_bytes: int = MAX_FRAME_BYTES) -> Envelope:
    """Parse and validate one frame (a `status` through msgspec when installed: same result)."""
    fast = decode_status(frame) if len(frame) <= max_frame_bytes else None
    if fast is not None:
        return Envelope(seq=fast[0], message=fast[1])
    return decode_reference(frame, max_frame_bytes)


def decode_reference(frame: bytes, max_frame_bytes: int = MAX_FRAME_BYTES) -> Envelope:
    """`decode` without the compiled fast path: the definition every frame is held to."""
    if len(frame) > max_frame_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"frame is {len(frame)} bytes (limit {max_frame_bytes})")
    try:
        # msgpack may raise exceptions other than its own (its docs say so): catch all here.
        raw = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            max_str_len=max_frame_bytes,
            max_bin_len=max_frame_bytes,
            max_array_len=max(4 * MAX_RANGES_PER_MESSAGE, max_frame_bytes // 8),
            max_map_len=MAX_MAP_ENTRIES,
            max_ext_len=0,
        )
    except Exception as exc:
        raise ProtocolError(ErrorCode.MALFORMED, f"not a msgpack frame ({type(exc).__name__})") from exc
    if not isinstance(raw, dict) or set(raw) != _ENVELOPE_KEYS:
        raise ProtocolError(ErrorCode.MALFORMED, "frame is not an envelope map {v, kind, seq, body}")
    version, kind, seq, body = raw["v"], raw["kind"], raw["seq"], raw["body"]
    if not _is_int(version) or version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {version!r} not supported (this peer speaks {PROTOCOL_VERSION})",
        )
    if not _is_int(seq) or not 0 <= seq <= MAX_SEQ:
        raise ProtocolError(ErrorCode.MALFORMED, "envelope seq must be an integer 0..2^63-1")
    if not isinstance(kind, str) or kind not in KINDS:
        raise ProtocolError(ErrorCode.UNKNOWN_KIND, f"unknown message kind {str(kind)[:40]!r}")
    if not isinstance(body, dict):
        raise ProtocolError(ErrorCode.MALFORMED, "envelope body must be a map")
    return Envelope(seq=seq, message=_build(KINDS[kind], body))


# ---- body conversion ------------------------------------------------------------------
# Each field type is compiled once into a validator function (value, where) -> value; the
# hot path (a status map of ~40 numbers, thousands per second) then costs a few type checks.
Validator = Callable[[Any, str], Any]
_FIELDS: dict[type[Message], list[tuple[str, Validator, str]]] = {}  # (name, validator, "kind.name")
_SCALARS = {int, float, str, bool, type(None)}


def _fields_of(cls: type[Message]) -> list[tuple[str, Validator, str]]:
    compiled = _FIELDS.get(cls)
    if compiled is None:
        resolved = typing.get_type_hints(cls)
        compiled = [(f.name, _compile(resolved[f.name]), f"{cls.kind}.{f.name}")
                    for f in fields(cls)]  # type: ignore[arg-type]
        _FIELDS[cls] = compiled
    return compiled


def _build(cls: type[Message], body: dict[Any, Any]) -> Message:
    compiled = _fields_of(cls)
    if len(body) != len(compiled) or any(name not in body for name, _, _ in compiled):
        names = {name for name, _, _ in compiled}
        missing = sorted(names - set(body))
        extra = sorted(str(k)[:40] for k in set(body) - names)
        raise ProtocolError(
            ErrorCode.INVALID_FIELD, f"{cls.kind}: missing fields {missing}, unknown fields {extra}"
        )
    values = {name: check(body[name], where) for name, check, where in compiled}
    try:
        return cls(**values)
    except ProtocolError:
        raise
    except (TypeError, ValueError) as exc:  # defensive: a validator tripped on an odd value
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"{cls.kind}: {exc}") from exc


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _wrong(where: str, expected: str, value: object) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_FIELD, f"{where}: expected {expected}, got {type(value).__name__}")


def _scalar_union(accepted: frozenset[type]) -> Validator:
    """Exact-type check for unions of int/float/str/bool/None (msgpack yields exact types).
    An int is accepted where only float is (and converted); floats must be finite."""
    float_only = float in accepted and int not in accepted
    names = "|".join(sorted(t.__name__ for t in accepted))

    def check(value: Any, where: str) -> Any:
        kind = type(value)
        if kind in accepted:
            if kind is float and not math.isfinite(value):
                raise _wrong(where, "finite number", value)
            if kind is str and len(value) > MAX_TEXT_CHARS:
                raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, f"{where}: string longer than {MAX_TEXT_CHARS}")
            return value
        if float_only and kind is int:
            return float(value)
        raise _wrong(where, names, value)

    return check


def _compile(tp: Any) -> Validator:
    origin = get_origin(tp)
    args = get_args(tp)
    if tp is PlainData:
        return lambda value, where: value  # validated by the message (check_plain_data)
    options = set(args) if origin in (Union, types.UnionType) else {tp}
    if options <= _SCALARS:
        return _scalar_union(frozenset(options))
    if origin in (Union, types.UnionType):
        compiled = [_compile(option) for option in args if option is not type(None)]
        nullable = type(None) in args

        def union(value: Any, where: str) -> Any:
            if value is None and nullable:
                return None
            first_error = None
            for check in compiled:
                try:
                    return check(value, where)
                except ProtocolError as exc:
                    first_error = first_error or exc
            raise first_error or _wrong(where, str(tp), value)

        return union
    if origin is Literal:
        allowed = args

        def literal(value: Any, where: str) -> Any:
            if isinstance(value, bool) or value not in allowed:
                raise ProtocolError(ErrorCode.INVALID_FIELD, f"{where}: {str(value)[:40]!r} not in {allowed}")
            return value

        return literal
    if tp is PageRanges:
        def pages(value: Any, where: str) -> Any:
            if type(value) is not bytes:
                raise _wrong(where, "bin (range-coded pages)", value)
            return PageRanges.from_wire(value)

        return pages
    if tp is RangeResult:
        def range_result(value: Any, where: str) -> Any:
            if type(value) is not list or len(value) != 3 or not all(type(v) is int for v in value):
                raise _wrong(where, "[start, count, status]", value)
            try:
                status = RangeStatus(value[2])
            except ValueError:
                raise ProtocolError(ErrorCode.INVALID_FIELD, f"{where}: unknown range status {value[2]}") from None
            return RangeResult(start=value[0], count=value[1], status=status)

        return range_result
    if origin is tuple:
        item = _compile(args[0])
        item_options = set(get_args(args[0])) if get_origin(args[0]) in (Union, types.UnionType) else {args[0]}
        # Arrays of scalars (a status's stats) are checked in bulk: one pass over the types
        # at C speed; the per-item check runs only to name what is wrong.
        bulk_types = frozenset(item_options) - {float} if item_options <= _SCALARS - {str} else None

        def sequence(value: Any, where: str) -> Any:
            if type(value) is not list:
                raise _wrong(where, "array", value)
            if len(value) > MAX_RANGES_PER_MESSAGE:
                raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, f"{where}: more than {MAX_RANGES_PER_MESSAGE} items")
            if bulk_types is not None:
                kinds = set(map(type, value))
                if kinds <= bulk_types or (kinds <= bulk_types | {float} and float in item_options
                                           and all(map(math.isfinite, filter(float.__instancecheck__, value)))):
                    return tuple(value)
            return tuple(item(v, where) for v in value)

        return sequence
    if origin is dict:
        item = _compile(args[1])

        def mapping(value: Any, where: str) -> Any:
            if type(value) is not dict:
                raise _wrong(where, "map", value)
            if len(value) > MAX_MAP_ENTRIES:
                raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, f"{where}: more than {MAX_MAP_ENTRIES} entries")
            out = {}
            for key, entry in value.items():
                if type(key) is not str or not 1 <= len(key) <= MAX_KEY_CHARS:
                    raise ProtocolError(ErrorCode.INVALID_FIELD, f"{where}: keys must be 1..{MAX_KEY_CHARS} chars")
                out[key] = item(entry, where)
            return out

        return mapping
    raise TypeError(f"no wire rule for {tp}")  # a bug in messages.py, found at first use


def _to_wire(value: Any) -> Any:
    if isinstance(value, PageRanges):
        return value.to_wire()
    if isinstance(value, RangeResult):
        return [value.start, value.count, int(value.status)]
    if isinstance(value, tuple):
        return [_to_wire(item) for item in value]
    return value
