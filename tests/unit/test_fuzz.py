"""No decode path raises anything but ProtocolError, whatever the bytes."""

import contextlib
import random
import time

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import ProtocolError, decode, encode
from tests.samples import SAMPLES

VALID_FRAMES = [encode(message, seq) for seq, message in enumerate(SAMPLES.values(), start=1)]


def _decode_only_protocol_errors(frame: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode(frame)


@given(st.binary(max_size=512))
def test_random_bytes(frame):
    _decode_only_protocol_errors(frame)


@given(st.sampled_from(VALID_FRAMES), st.data())
def test_mutated_valid_frames(frame, data):
    mutated = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(mutated) - 1))
        mutated[position] = data.draw(st.integers(0, 255))
    _decode_only_protocol_errors(bytes(mutated))


scalar = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True), st.text(max_size=20), st.binary(max_size=20),
)
plain = st.recursive(
    scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300)
@given(st.sampled_from(sorted(SAMPLES)), st.dictionaries(st.text(max_size=24), plain, max_size=10))
def test_structured_garbage_bodies(kind, body):
    # Real field names with random values exercise every validator.
    real = {name: value for name, value in msgpack.unpackb(encode(SAMPLES[kind], 1))["body"].items()}
    for key in list(body)[: len(body) // 2]:
        if real:
            real[next(iter(real))] = body.pop(key)
    frame = msgpack.packb({"v": 1, "kind": kind, "seq": 1, "body": {**real, **body}}, use_bin_type=True)
    _decode_only_protocol_errors(frame)


def test_hundred_thousand_malformed_frames_bounded():
    """Acceptance: ≥ 100,000 generated malformed frames, only ProtocolError, within 120 s."""
    rng = random.Random(20261123)
    deadline = time.monotonic() + 110
    rejected = accepted = 0
    for index in range(100_000):
        assert time.monotonic() < deadline, f"only {index} frames checked before the deadline"
        frame = bytearray(VALID_FRAMES[index % len(VALID_FRAMES)])
        mode = index % 4
        if mode == 0:  # flip bytes
            for _ in range(rng.randint(1, 6)):
                frame[rng.randrange(len(frame))] = rng.randrange(256)
        elif mode == 1:  # truncate
            frame = frame[: rng.randrange(len(frame))]
        elif mode == 2:  # splice random bytes in
            at = rng.randrange(len(frame))
            frame[at:at] = rng.randbytes(rng.randint(1, 16))
        else:  # pure noise
            frame = bytearray(rng.randbytes(rng.randint(0, 64)))
        try:
            decode(bytes(frame))
            accepted += 1
        except ProtocolError:
            rejected += 1
    assert rejected + accepted == 100_000
    assert rejected > 50_000  # most mutations must be caught, not silently accepted
