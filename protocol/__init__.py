"""balloonlab's wire contract: envelopes, messages, page ranges, limits and error codes.

Pure: nothing here opens sockets; only `protocol.keys` reads or writes files. See
protocol/README.md for the specification.
"""

from protocol.codec import Envelope, decode, encode
from protocol.errors import ErrorCode, ProtocolError
from protocol.limits import PAGE_SIZE_BYTES, PROTOCOL_VERSION
from protocol.messages import (
    AGENT_STATES,
    HOST_PARAM_KEYS,
    KINDS,
    SHARE_LEVELS,
    VM_PARAM_KEYS,
    Bye,
    ControlOk,
    Error,
    GetStatus,
    Heartbeat,
    Hello,
    Lock,
    LockResult,
    Message,
    RangeResult,
    RangeStatus,
    SetHostParams,
    SetManualTarget,
    SetTarget,
    SetVmParams,
    Status,
    StatusReply,
    Unlock,
    UnlockResult,
    Welcome,
    stats_map,
    stats_values,
)
from protocol.pages import PageRanges

__all__ = [
    "AGENT_STATES",
    "HOST_PARAM_KEYS",
    "KINDS",
    "PAGE_SIZE_BYTES",
    "PROTOCOL_VERSION",
    "SHARE_LEVELS",
    "VM_PARAM_KEYS",
    "Bye",
    "ControlOk",
    "Envelope",
    "Error",
    "ErrorCode",
    "GetStatus",
    "Heartbeat",
    "Hello",
    "Lock",
    "LockResult",
    "Message",
    "PageRanges",
    "ProtocolError",
    "RangeResult",
    "RangeStatus",
    "SetHostParams",
    "SetManualTarget",
    "SetTarget",
    "SetVmParams",
    "Status",
    "StatusReply",
    "Unlock",
    "UnlockResult",
    "Welcome",
    "decode",
    "encode",
    "stats_map",
    "stats_values",
]
