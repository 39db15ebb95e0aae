from pathlib import Path

import pytest

from protocol import (
    KINDS,
    ErrorCode,
    Hello,
    ProtocolError,
    SetHostParams,
    SetVmParams,
    Status,
    decode,
    encode,
    stats_map,
    stats_values,
)
from protocol.limits import MAX_FRAME_BYTES, MAX_INTERVAL_MS, MAX_MEMSZ_BYTES, MAX_SEQ, PROTOCOL_VERSION
from tests.samples import SAMPLES

GOLDEN_DIR = Path(__file__).parent.parent / "data" / "golden"


def test_every_kind_has_a_sample():
    assert set(SAMPLES) == set(KINDS)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_round_trip(kind):
    message = SAMPLES[kind]
    envelope = decode(encode(message, 42))
    assert envelope.seq == 42
    assert envelope.message == message


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_golden_bytes(kind):
    """The wire format is frozen: a change here needs a protocol version bump."""
    seq = sorted(KINDS).index(kind) + 1
    golden = (GOLDEN_DIR / f"{kind}.bin").read_bytes()
    assert encode(SAMPLES[kind], seq) == golden
    assert decode(golden).message == SAMPLES[kind]


def _hello(**overrides):
    fields = dict(
        vm_id="web", memsz_bytes=1 << 29, agent_version="x", page_kind="vpn", supports_2m=False,
        cgroup_version=1, max_batch_pages=512, held_pages=0, last_host_session_id=None, stats_keys=(),
    )
    fields.update(overrides)
    return Hello(**fields)


@pytest.mark.parametrize(
    "overrides",
    [
        {"vm_id": ""},
        {"vm_id": "a b"},
        {"vm_id": "x" * 65},
        {"memsz_bytes": -4096},
        {"memsz_bytes": 4097},
        {"memsz_bytes": 1 << 60},
        {"cgroup_version": 3},
        {"max_batch_pages": 0},
        {"held_pages": (1 << 29) // 4096 + 1},
    ],
)
def test_hello_validation(overrides):
    with pytest.raises(ProtocolError) as info:
        _hello(**overrides)
    assert info.value.code == ErrorCode.INVALID_FIELD


def _frame(kind, body, v=PROTOCOL_VERSION, seq=1):
    import msgpack

    return msgpack.packb({"v": v, "kind": kind, "seq": seq, "body": body}, use_bin_type=True)


def _status_body(**overrides):
    body = {"balloon_pages": 0, "acked_target_seq": 0, "refused_pages": 0, "agent_state": "idle",
            "usage_bytes": None, "ws_touched_ratio": None, "ws_samples": 0, "ws_current_ratio": None,
            "ws_method": "none", "stats": []}
    body.update(overrides)
    return body


def _welcome_body(**overrides):
    body = {"host_session_id": "sess", "report_interval_ms": 1000, "host_timeout_ms": 5000,
            "batch_limit_pages": 512, "sample_period_ms": None, "reclaim": False, "vm_secret": "s" * 16}
    body.update(overrides)
    return body


def _hello_body(**overrides):
    body = {
        "vm_id": "web", "memsz_bytes": 1 << 29, "agent_version": "x", "page_kind": "vpn",
        "supports_2m": False, "cgroup_version": 1, "max_batch_pages": 512, "held_pages": 0,
        "last_host_session_id": None, "stats_keys": ["usage_bytes"], "vm_secret": None,
    }
    body.update(overrides)
    return body


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"", ErrorCode.MALFORMED),
        (b"\xc1", ErrorCode.MALFORMED),
        (_frame("hello", _hello_body(), v=1), ErrorCode.UNSUPPORTED_VERSION),  # stats as a map
        (_frame("hello", _hello_body(), v=2), ErrorCode.UNSUPPORTED_VERSION),  # no vm secrets
        (_frame("hello", _hello_body(), v=3), ErrorCode.UNSUPPORTED_VERSION),  # policy inputs in stats
        (_frame("hello", _hello_body(), v=PROTOCOL_VERSION + 1), ErrorCode.UNSUPPORTED_VERSION),
        (_frame("hello", _hello_body(vm_secret="short")), ErrorCode.INVALID_FIELD),
        (_frame("hello", _hello_body(), v="1"), ErrorCode.UNSUPPORTED_VERSION),
        (_frame("nope", {}), ErrorCode.UNKNOWN_KIND),
        (_frame("hello", _hello_body(), seq=-1), ErrorCode.MALFORMED),
        (_frame("hello", []), ErrorCode.MALFORMED),
        (_frame("hello", _hello_body(extra=1)), ErrorCode.INVALID_FIELD),
        (_frame("hello", {"vm_id": "web"}), ErrorCode.INVALID_FIELD),
        (_frame("hello", _hello_body(memsz_bytes="1")), ErrorCode.INVALID_FIELD),
        (_frame("hello", _hello_body(memsz_bytes=True)), ErrorCode.INVALID_FIELD),
        (_frame("hello", _hello_body(page_kind="ppn")), ErrorCode.INVALID_FIELD),
        (_frame("hello", _hello_body(agent_version="x" * 5000)), ErrorCode.LIMIT_EXCEEDED),
        (_frame("hello", _hello_body(stats_keys=["a", "a"])), ErrorCode.INVALID_FIELD),
        (_frame("hello", _hello_body(stats_keys=[""])), ErrorCode.INVALID_FIELD),
        (_frame("hello", _hello_body(stats_keys=["k" * 65])), ErrorCode.INVALID_FIELD),
        (_frame("hello", _hello_body(stats_keys=[1])), ErrorCode.INVALID_FIELD),
        (_frame("hello", _hello_body(stats_keys=[f"k{i}" for i in range(257)])), ErrorCode.LIMIT_EXCEEDED),
        (_frame("set_target", {"target_pages": -1, "target_seq": 1}), ErrorCode.INVALID_FIELD),
        (_frame("set_target", {"target_pages": 2**64 - 1, "target_seq": 1}), ErrorCode.INVALID_FIELD),
        (_frame("lock", {"pages": [1, 2], "adopt": False}), ErrorCode.INVALID_FIELD),
        (_frame("lock", {"pages": b"", "adopt": False}), ErrorCode.INVALID_FIELD),
        (_frame("lock_result", {"results": [[1, 1, 9]], "target_pages": 0, "target_seq": 0}),
         ErrorCode.INVALID_FIELD),
        (_frame("status_reply", {"snapshot": {"x": float("nan")}}), ErrorCode.INVALID_FIELD),
        (b"\x00" * (MAX_FRAME_BYTES + 1), ErrorCode.TOO_LARGE),
    ],
)
def test_decode_rejects_with_code(frame, code):
    with pytest.raises(ProtocolError) as info:
        decode(frame)
    assert info.value.code == code


def test_status_unknown_stat_is_none_not_zero():
    status = Status(**_status_body(stats=(None,)))
    assert decode(encode(status, 1)).message.stats == (None,)


@pytest.mark.parametrize(
    "params",
    [{"shares": "huge"}, {"shares": -1}, {"reservation_bytes": "1G"}, {"colour": 1}, {}],
)
def test_vm_params_validation(params):
    with pytest.raises(ProtocolError):
        SetVmParams(vm_id="db", params=params)


@pytest.mark.parametrize(
    "params",
    [{"idle_tax_ratio": 1.0}, {"idle_tax_ratio": -0.1}, {"sample_period_ms": 1.5},
     {"ctl_max_percent": 100}, {"balance_period_ms": 0}, {"host_memory_bytes": True}],
)
def test_host_params_validation(params):
    with pytest.raises(ProtocolError):
        SetHostParams(params=params)


def test_encode_refuses_oversized_frame():
    from protocol import StatusReply

    big = StatusReply(snapshot={"vms": ["x" * 1000] * 2000})
    with pytest.raises(ProtocolError) as info:
        encode(big, 1)
    assert info.value.code == ErrorCode.TOO_LARGE


# ---- the stats array's bulk fast path gives the same answers as the per-item checks ---------
def _status_frame(stats: list) -> bytes:
    return _frame("status", _status_body(stats=stats))


@pytest.mark.parametrize(("stats", "error"), [
    ([1, 2.5, None], None),
    ([], None),
    ([0, -3, 2**64 - 1, 1e300], None),
    ([True], "expected"),  # a bool is not a number here
    ([float("nan")], "finite"),
    ([float("inf"), 1], "finite"),
    ([1, float("-inf")], "finite"),
    (["text"], "expected"),
    ([[1]], "expected"),
    ({"a": 1}, "expected array"),  # the version-1 map form
    ([0] * 257, "more than 256"),
])
def test_stats_array_validation(stats, error):
    from protocol import ProtocolError, decode

    if error is None:
        assert decode(_status_frame(stats)).message.stats == tuple(stats)
    else:
        with pytest.raises(ProtocolError, match=error):
            decode(_status_frame(stats))


def test_stats_names_and_values_round_trip():
    keys = ("usage_bytes", "ws_current_ratio", "oom_events")
    values = stats_values(keys, {"usage_bytes": 5, "oom_events": 0, "not_declared": 1})
    assert values == (5, None, 0)  # absent → None (unknown), undeclared names are not sent
    assert stats_map(keys, values) == {"usage_bytes": 5, "ws_current_ratio": None, "oom_events": 0}


# ---- protocol v4's typed fields: every new numeric field at its bounds, ±1 and beyond ------------
_BODIES = {"status": _status_body, "welcome": _welcome_body, "settings": lambda **o: {"sample_period_ms": 1000, **o}}
_INT_FIELDS = [  # (kind, field, lowest valid, highest valid)
    ("status", "usage_bytes", 0, MAX_MEMSZ_BYTES),
    ("status", "ws_samples", 0, MAX_SEQ),
    ("welcome", "sample_period_ms", 10, MAX_INTERVAL_MS),
    ("settings", "sample_period_ms", 10, MAX_INTERVAL_MS),
]
_INT_CASES = [(kind, name, value, ok)
              for kind, name, low, high in _INT_FIELDS
              for value, ok in [(low, True), (low + 1, True), (high - 1, True), (high, True), (low - 1, False),
                                (high + 1, False), (-1, low == -1), (2**63, high >= 2**63),
                                (2**64 - 1, False), (1.0 * low, False), (True, False), ("1", False)]]
_RATIO_CASES = [("status", name, value, ok)
                for name in ("ws_touched_ratio", "ws_current_ratio")
                for value, ok in [(0.0, True), (1.0, True), (0, True), (1, True), (0.5, True), (None, True),
                                  (-1, False), (-1e-9, False), (1.0000001, False), (2, False), (2**63, False),
                                  (2**64 - 1, False), (float("nan"), False), (float("inf"), False), ("0.5", False)]]


def _decoders():
    from protocol.codec import decode_reference

    return [decode, decode_reference]  # `decode` takes the compiled status path when msgspec is there


@pytest.mark.parametrize(("kind", "name", "value", "ok"), _INT_CASES + _RATIO_CASES,
                         ids=lambda v: repr(v)[:24])
def test_typed_fields_at_their_bounds(kind, name, value, ok):
    frame = _frame(kind, _BODIES[kind](**{name: value}))
    for decoder in _decoders():
        if ok:
            message = decoder(frame).message
            got = getattr(message, name)
            assert got == value and (type(got) is bool) == (type(value) is bool)
            assert decode(encode(message, 1)).message == message
        else:
            with pytest.raises(ProtocolError) as info:
                decoder(frame)
            assert info.value.code == ErrorCode.INVALID_FIELD, (decoder, info.value)


@pytest.mark.parametrize(("kind", "name", "value", "ok"), [
    *(("status", "ws_method", m, True) for m in ("referenced", "active_lru", "none")),
    ("status", "ws_method", "Referenced", False), ("status", "ws_method", "", False),
    ("status", "ws_method", 1, False), ("status", "ws_method", None, False),
    ("status", "usage_bytes", None, True), ("welcome", "sample_period_ms", None, True),
    ("welcome", "reclaim", True, True), ("welcome", "reclaim", 1, False), ("welcome", "reclaim", None, False),
    ("settings", "sample_period_ms", None, False),
])
def test_typed_fields_other_values(kind, name, value, ok):
    test_typed_fields_at_their_bounds(kind, name, value, ok)


@pytest.mark.parametrize(("kind", "gone"), [("status", "ws_period_ms"), ("welcome", "settings")])
def test_fields_nobody_read_are_gone_from_v4(kind, gone):
    with pytest.raises(ProtocolError) as info:
        decode(_frame(kind, _BODIES[kind](**{gone: 0 if gone.endswith("_ms") else {}})))
    assert info.value.code == ErrorCode.INVALID_FIELD and "unknown fields" in info.value.detail


def test_settings_is_host_to_agent_only_on_the_agent_plane():
    from protocol import Settings

    assert Settings.plane == "agent" and decode(encode(Settings(sample_period_ms=10), 1)).message.sample_period_ms == 10


@pytest.mark.parametrize(("code", "label"), [(1, "MALFORMED"), (13, "INTERNAL"), (99, "99"), (-1, "-1")])
def test_an_error_code_from_the_wire_has_a_label_even_when_unknown(code, label):
    assert ErrorCode.label(code) == label
