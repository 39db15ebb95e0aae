"""The one exception of the wire layer and the numeric codes that travel in `error` messages.

    ProtocolError            anything that cannot be decoded or fails validation
      .code: ErrorCode       what went wrong, as sent on the wire
      .detail: str           a readable sentence (never a traceback)

Daemons map every failure on a peer's frame to an ErrorCode and reply with an `error`
message; they never send exception text from deeper layers.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Codes carried by the `error` message (field `code`). Stable: never renumber."""

    MALFORMED = 1  # not msgpack, or not an envelope map with the four keys
    TOO_LARGE = 2  # frame bigger than MAX_FRAME_BYTES
    UNSUPPORTED_VERSION = 3  # envelope "v" is not PROTOCOL_VERSION
    UNKNOWN_KIND = 4  # "kind" is not in the registry
    INVALID_FIELD = 5  # a body field is missing, of the wrong type, or out of range
    LIMIT_EXCEEDED = 6  # too many ranges/pages/entries, string too long
    NOT_REGISTERED = 7  # agent sent something before hello/welcome
    UNAUTHORIZED = 8  # peer not allowed (CURVE allowlist, plain TCP off loopback)
    CONFLICT = 9  # vm id already registered by another live agent
    ADMISSION_REFUSED = 10  # reservation cannot be guaranteed
    UNKNOWN_VM = 11  # control request names a vm that is not registered
    UNEXPECTED_KIND = 12  # a valid kind sent to the wrong endpoint or in the wrong direction
    INTERNAL = 13  # the daemon failed; details are in its log, not on the wire

    @classmethod
    def label(cls, code: int) -> str:
        """The name of a code from the wire, or the number itself when this version has none."""
        try:
            return cls(code).name
        except ValueError:
            return str(code)


class ProtocolError(Exception):
    """A frame or message that cannot be accepted. Carries the wire error code."""

    def __init__(self, code: ErrorCode, detail: str) -> None:
        super().__init__(f"{code.name}: {detail}")
        self.code = code
        self.detail = detail

    def __repr__(self) -> str:
        return f"ProtocolError({self.code.name}, {self.detail!r})"
