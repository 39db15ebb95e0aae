"""The hot frame of a big host — an agent's `status`, 2,000 a second on a 2,000-vm host —
parsed and type-checked by msgspec's compiled decoder when msgspec is installed.

It only ever *accepts*: it returns the same sequence number and message the reference decoder
(`protocol.codec`) would, or None, and then the reference decodes the frame or refuses it with
its own error. So errors, limits and every other kind stay defined in one place, and a host
without msgspec (the offline Debian image) behaves identically, only slower. Property tests
(tests/unit/test_fast_status.py) hold the two to the same answers.

Where msgspec's rules differ from the reference's, this module closes the gap before it
accepts: non-finite floats, string lengths, array lengths, and map sizes (msgspec reads a map
with repeated keys, last one winning as msgpack-python does, but has no entry limit; see
`FAST_MAX_FRAME_BYTES`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import cast

from protocol.errors import ProtocolError
from protocol.limits import MAX_MAP_ENTRIES, MAX_SEQ, MAX_TEXT_CHARS, PROTOCOL_VERSION
from protocol.messages import Status

try:
    import msgspec
except ImportError:  # optional: the reference decoder handles everything without it
    msgspec = None  # type: ignore[assignment]

# A body map the reference would refuse for size has more than MAX_MAP_ENTRIES entries, each at
# least 7 bytes (the shortest field name, "stats", is 6 bytes as msgpack, plus a 1-byte value);
# any other key is refused by both. Frames shorter than that cannot carry such a map, so the fast
# path takes only those (an agent's status is ~350 bytes).
FAST_MAX_FRAME_BYTES = 7 * (MAX_MAP_ENTRIES + 1) - 1
_INT_OR_NONE = frozenset({int, type(None)})
_FIXMAP_4 = 0x84  # the envelope {v, kind, seq, body}: exactly four entries, so no repeated keys

if msgspec is not None:

    class _StatusBody(msgspec.Struct, forbid_unknown_fields=True):
        balloon_pages: int
        acked_target_seq: int
        refused_pages: int
        agent_state: str
        usage_bytes: int | None
        ws_touched_ratio: float | None
        ws_samples: int
        ws_current_ratio: float | None
        ws_method: str  # Status checks it is one of WS_METHODS
        stats: list[int | float | None]

    class _StatusFrame(msgspec.Struct, forbid_unknown_fields=True):
        v: int
        kind: str
        seq: int
        body: _StatusBody

    _decoder = msgspec.msgpack.Decoder(_StatusFrame)


def decode_status(frame: bytes) -> tuple[int, Status] | None:
    """(seq, message) of a valid `status` frame, or None for anything else (including any frame
    this path is not sure about): the caller then uses the reference decoder."""
    if msgspec is None or len(frame) > FAST_MAX_FRAME_BYTES or not frame or frame[0] != _FIXMAP_4:
        return None
    try:
        raw = _decoder.decode(frame)
    except Exception:  # msgspec.DecodeError/ValidationError, or anything odd: the reference decides
        return None
    body = raw.body
    stats = body.stats
    if (raw.v != PROTOCOL_VERSION or raw.kind != "status" or not 0 <= raw.seq <= MAX_SEQ
            or len(body.agent_state) > MAX_TEXT_CHARS or len(body.ws_method) > MAX_TEXT_CHARS
            or (body.ws_touched_ratio is not None and not math.isfinite(body.ws_touched_ratio))
            or (body.ws_current_ratio is not None and not math.isfinite(body.ws_current_ratio))
            # An agent's stats are mostly ints: with only ints and None there is no float to check.
            or (not set(map(type, stats)) <= _INT_OR_NONE
                and not all(map(math.isfinite, cast("Iterator[float]", filter(float.__instancecheck__, stats)))))):
        return None
    try:
        message = Status(balloon_pages=body.balloon_pages, acked_target_seq=body.acked_target_seq,
                         refused_pages=body.refused_pages, agent_state=body.agent_state,
                         usage_bytes=body.usage_bytes, ws_touched_ratio=body.ws_touched_ratio,
                         ws_samples=body.ws_samples, ws_current_ratio=body.ws_current_ratio,
                         ws_method=body.ws_method,  # type: ignore[arg-type]  # checked by Status
                         stats=tuple(stats))
    except ProtocolError:
        return None
    return raw.seq, message
