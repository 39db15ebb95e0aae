"""The compiled `status` path (protocol/fast_status.py) accepts only what the reference decoder
accepts, with the same result, and does accept every valid status an agent sends."""

import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import ProtocolError, Status, decode, encode, fast_status
from protocol.codec import decode_reference
from protocol.fast_status import FAST_MAX_FRAME_BYTES, decode_status
from protocol.limits import MAX_MEMSZ_BYTES, MAX_PAGES, MAX_SEQ, MAX_TEXT_CHARS, PROTOCOL_VERSION
from protocol.messages import AGENT_STATES, WS_METHODS
from tests.samples import SAMPLES

STATUS_FIELDS = ("balloon_pages", "acked_target_seq", "refused_pages", "agent_state", "usage_bytes",
                 "ws_touched_ratio", "ws_samples", "ws_current_ratio", "ws_method", "stats")


def _reference(frame: bytes):
    try:
        return decode_reference(frame)
    except ProtocolError:
        return None


def _assert_agrees(frame: bytes) -> bool:
    """The fast answer, when there is one, is the reference's; returns whether it answered."""
    fast = decode_status(frame)
    if fast is None:
        return False
    reference = _reference(frame)
    assert reference is not None, f"fast path accepted a frame the reference refuses: {frame!r}"
    assert fast[0] == reference.seq
    # repr as well as ==: 1 == 1.0, but a float field must come out a float on both paths
    assert fast[1] == reference.message and repr(fast[1]) == repr(reference.message)
    return True


valid_stat = st.one_of(st.none(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False, allow_infinity=False))
valid_body = st.fixed_dictionaries({
    "balloon_pages": st.integers(0, MAX_PAGES),
    "acked_target_seq": st.integers(0, MAX_SEQ),
    "refused_pages": st.integers(0, MAX_PAGES),
    "agent_state": st.sampled_from(AGENT_STATES),
    "usage_bytes": st.none() | st.integers(0, MAX_MEMSZ_BYTES),
    "ws_touched_ratio": st.none() | st.floats(0.0, 1.0) | st.sampled_from([0, 1]),
    "ws_samples": st.integers(0, MAX_SEQ),
    "ws_current_ratio": st.none() | st.floats(0.0, 1.0) | st.sampled_from([0, 1]),
    "ws_method": st.sampled_from(WS_METHODS),
    "stats": st.lists(valid_stat, max_size=64),
})


@settings(max_examples=400)
@given(valid_body, st.integers(0, MAX_SEQ))
def test_every_valid_status_takes_the_fast_path_with_the_reference_result(body, seq):
    frame = msgpack.packb({"v": PROTOCOL_VERSION, "kind": "status", "seq": seq, "body": body}, use_bin_type=True)
    assert _assert_agrees(frame)


def test_an_agents_real_status_takes_the_fast_path():
    frame = encode(SAMPLES["status"], 7)
    assert len(frame) <= FAST_MAX_FRAME_BYTES and decode_status(frame) is not None
    assert decode(frame) == decode_reference(frame)


garbage = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=8),
    st.binary(max_size=8), st.lists(st.integers(0, 3) | st.floats() | st.booleans() | st.none(), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(-9, 9), max_size=2), st.just("x" * (MAX_TEXT_CHARS + 1)),
)


@settings(max_examples=1500)
@given(valid_body, st.data())
def test_spoiled_statuses_are_left_to_the_reference(body, data):
    envelope = {"v": PROTOCOL_VERSION, "kind": "status", "seq": 1, "body": dict(body)}
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(["v", "kind", "seq", "drop", "extra", "envelope_extra", *STATUS_FIELDS]))
        if where in ("v", "kind", "seq"):
            envelope[where] = data.draw(garbage | st.sampled_from([1, 3, "heartbeat", -1, MAX_SEQ + 1, True]))
        elif where == "drop":
            envelope["body"].pop(data.draw(st.sampled_from(STATUS_FIELDS)), None)
        elif where == "extra":
            envelope["body"][data.draw(st.text(max_size=12))] = data.draw(garbage)
        elif where == "envelope_extra":
            envelope[data.draw(st.text(max_size=6))] = 0
        elif where == "stats":
            envelope["body"]["stats"] = data.draw(st.lists(valid_stat | garbage, max_size=300))
        else:
            envelope["body"][where] = data.draw(garbage | st.sampled_from(
                [math.nan, math.inf, -1, 1.5, 2.0, 2**63, 2**64 - 1, MAX_MEMSZ_BYTES + 1, "active", "Referenced"]))
    _assert_agrees(msgpack.packb(envelope, use_bin_type=True))


@given(st.binary(max_size=600))
def test_random_bytes_are_never_accepted_wrongly(frame):
    _assert_agrees(frame)


@settings(max_examples=600)
@given(st.data())
def test_mutated_status_frames(data):
    frame = bytearray(encode(SAMPLES["status"], 3))
    mode = data.draw(st.sampled_from(["flip", "truncate", "append"]))
    if mode == "flip":
        for _ in range(data.draw(st.integers(1, 6))):
            frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    elif mode == "truncate":
        frame = frame[: data.draw(st.integers(0, len(frame) - 1))]
    else:
        frame += data.draw(st.binary(min_size=1, max_size=8))  # trailing bytes: msgpack refuses them
    _assert_agrees(bytes(frame))


def _packed_map(entries: list[tuple[str, object]]) -> bytes:
    """A msgpack map written entry by entry, so keys may repeat (a dict cannot say that)."""
    header = bytes([0x80 | len(entries)]) if len(entries) < 16 else b"\xde" + len(entries).to_bytes(2, "big")
    return header + b"".join(msgpack.packb(k) + msgpack.packb(v, use_bin_type=True) for k, v in entries)


def _status_frame(body_entries: list[tuple[str, object]]) -> bytes:
    """A status envelope {v, kind, seq, body} whose body map is written entry by entry."""
    envelope = [("v", PROTOCOL_VERSION), ("kind", "status"), ("seq", 1)]
    return (b"\x84" + b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in envelope)
            + msgpack.packb("body") + _packed_map(body_entries))


def test_repeated_keys_mean_the_same_on_both_paths():
    body = msgpack.unpackb(encode(SAMPLES["status"], 1))["body"]
    entries = [("balloon_pages", 5), *body.items()]  # repeated: the last one counts on both
    frame = _status_frame(entries)
    assert _assert_agrees(frame)
    assert decode(frame).message.balloon_pages == body["balloon_pages"]


def test_a_body_too_big_for_the_reference_is_never_taken():
    # 300 repeated entries: the reference refuses the map (max 256 entries); the frame is
    # longer than FAST_MAX_FRAME_BYTES, so the fast path never sees it.
    body = msgpack.unpackb(encode(SAMPLES["status"], 1))["body"]
    entries = [("ws_samples", 1)] * 300 + list(body.items())
    frame = _status_frame(entries)
    assert len(frame) > FAST_MAX_FRAME_BYTES and decode_status(frame) is None
    with pytest.raises(ProtocolError):
        decode(frame)


def test_without_msgspec_every_frame_goes_to_the_reference(monkeypatch):
    monkeypatch.setattr(fast_status, "msgspec", None)
    frame = encode(SAMPLES["status"], 9)
    assert decode_status(frame) is None
    assert decode(frame) == decode_reference(frame)
    assert isinstance(decode(frame).message, Status)
