"""hostd's core driven by frames and a fake clock: no sockets."""

import pytest

from hostd.config import HostConfig, VmDefaults
from hostd.core import HostCore
from protocol import (
    ControlOk,
    Error,
    ErrorCode,
    GetStatus,
    Hello,
    Lock,
    LockResult,
    PageRanges,
    RangeStatus,
    SetHostParams,
    SetManualTarget,
    SetTarget,
    SetVmParams,
    Status,
    StatusReply,
    Unlock,
    Welcome,
    decode,
    encode,
)

MiB = 1 << 20
PAGES_PER_MiB = 256


STATS_KEYS = ("usage_bytes", "ws_samples", "ws_current_ratio")


def hello(vm_id, memsz=256 * MiB, held=0, session=None):
    return Hello(vm_id=vm_id, memsz_bytes=memsz, agent_version="t", page_kind="vpn", supports_2m=False,
                 cgroup_version=2, max_batch_pages=512, held_pages=held, last_host_session_id=session,
                 stats_keys=STATS_KEYS)


def status(balloon_pages=0, usage=100 * MiB, ws=None, samples=0, state="idle", current=None):
    return Status(balloon_pages=balloon_pages, acked_target_seq=0, refused_pages=0, agent_state=state,
                  stats=(usage, samples, current), ws_touched_ratio=ws, ws_method="referenced", ws_period_ms=1000)


class Harness:
    def __init__(self, **config):
        config.setdefault("host_memory_bytes", 400 * MiB)
        config.setdefault("report_interval_ms", 10)  # settle window (7 reports) ends at once
        config.setdefault("balance_period_ms", 15_000)
        self.core = HostCore(HostConfig(**config), "sess", now_ms=0)
        self.now = 0
        self.seq = 0

    def send(self, vm_id, message):
        self.seq += 1
        out = self.core.handle_agent(vm_id.encode(), encode(message, self.seq), self.now)
        return [(identity.decode(), decode(frame).message) for identity, frame in out]

    def control(self, message):
        reply, out = self.core.handle_control(encode(message, 1), self.now)
        return decode(reply).message, [(i.decode(), decode(f).message) for i, f in out]

    def tick(self):
        return [(identity.decode(), decode(frame).message) for identity, frame in self.core.tick(self.now)]

    def targets(self, out):
        return {vm: m.target_pages for vm, m in out if isinstance(m, SetTarget)}


def test_restart_holds_adopted_balloons_until_settled():
    h = Harness(report_interval_ms=1000)  # settle window: 7 s
    h.send("a", hello("a", held=20_000, session="old"))
    h.send("a", Lock(pages=PageRanges(((0, 20_000),)), adopt=True))
    assert h.targets(h.send("a", status(balloon_pages=20_000, ws=0.5, samples=3))) == {}  # alone: would be 0
    assert h.targets(h.tick()) == {}
    h.now = 7_001
    h.send("a", status(balloon_pages=20_000, ws=0.5, samples=3))
    assert h.targets(h.tick()) == {"a": 0}  # settled: the policy decides


def test_hello_welcome_and_adoption():
    h = Harness()
    out = h.send("a", hello("a", held=1000))
    assert isinstance(out[0][1], Welcome) and out[0][1].host_session_id == "sess"
    assert h.core.vms["a"].balloon_target_pages == 1000  # adopted until the policy decides
    lock = h.send("a", Lock(pages=PageRanges(((0, 1000),)), adopt=True))
    assert [r.status for r in lock[0][1].results] == [RangeStatus.OK]


def test_not_registered_and_bad_identity():
    h = Harness()
    [(_, reply)] = h.send("ghost", status())
    assert isinstance(reply, Error) and reply.code == ErrorCode.NOT_REGISTERED
    out = h.core.handle_agent(b"other", encode(hello("a"), 1), 0)
    assert decode(out[0][1]).message.code == ErrorCode.INVALID_FIELD


def test_conflict_then_accepted_after_loss():
    h = Harness(report_interval_ms=1000)
    h.send("a", hello("a"))
    [(_, reply)] = h.send("a", hello("a"))  # a second agent claiming the id, no session
    assert reply.code == ErrorCode.CONFLICT
    h.now = 3_500
    h.tick()
    assert not h.core.vms["a"].alive
    assert isinstance(h.send("a", hello("a"))[0][1], Welcome)


def test_malformed_frames_answered_and_counted():
    h = Harness()
    for frame in (b"", b"\x93\x01", encode(SetTarget(target_pages=1, target_seq=1), 1)):
        [(_, reply)] = [(i, decode(f).message) for i, f in h.core.handle_agent(b"x", frame, 0)]
        assert isinstance(reply, Error)
    assert h.core.protocol_errors == {"MALFORMED": 2, "UNEXPECTED_KIND": 1}


def test_idle_vm_gets_the_larger_balloon_under_idle_tax():
    h = Harness(host_memory_bytes=383 * MiB)  # ~360 MiB for vms after minFree
    h.send("idle", hello("idle"))
    h.send("busy", hello("busy"))
    h.send("idle", status(usage=250 * MiB, ws=10 / 256, samples=1))
    h.send("busy", status(usage=250 * MiB, ws=200 / 256, samples=1))  # free < 4 %: soft → recompute
    assert h.core.state != "high"
    targets = h.targets(h.tick())
    assert targets["idle"] > targets["busy"]
    assert targets["idle"] == pytest.approx((256 - 108.75) * PAGES_PER_MiB, abs=2 * PAGES_PER_MiB)
    # Change τ live: targets move at once.
    reply, out = h.control(SetHostParams(params={"idle_tax_ratio": 0.0}))
    assert isinstance(reply, ControlOk)
    targets = h.targets(out)
    assert targets["idle"] == targets["busy"]
    events = h.core.drain_events()
    assert any(e["event"] == "target" and e["trigger"] == "host settings changed" for e in events)


def test_ledger_mismatch_resets_after_three_reports():
    h = Harness()
    h.send("a", hello("a"))
    for _ in range(2):
        assert not any(isinstance(m, Error) for _, m in h.send("a", status(balloon_pages=512)))
    out = h.send("a", status(balloon_pages=512))
    assert any(isinstance(m, Error) and m.code == ErrorCode.NOT_REGISTERED for _, m in out)
    assert h.core.vms["a"].resets == 1


def test_lock_refused_beyond_cap_and_unlock():
    h = Harness()
    h.send("a", hello("a", memsz=100 * MiB))
    cap = h.core.vms["a"].balloon_max_pages  # 65 % of memsz
    [(_, result)] = h.send("a", Lock(pages=PageRanges(((0, cap + 1),)), adopt=False))
    assert isinstance(result, LockResult) and result.results[0].status == RangeStatus.REFUSED
    h.send("a", Lock(pages=PageRanges(((0, 100),)), adopt=False))
    [(_, result)] = h.send("a", Unlock(pages=PageRanges(((50, 100),))))
    assert result.results[0].status == RangeStatus.UNKNOWN  # half of it was never held
    assert h.core.ledger.held_pages("a") == 50


def test_control_validation_changes_nothing():
    h = Harness()
    h.send("a", hello("a"))
    h.send("b", hello("b"))
    assert isinstance(h.control(SetVmParams(vm_id="b", params={"reservation_bytes": 200 * MiB}))[0], ControlOk)
    before = h.core.vms["a"].params
    for request, code in [
        (SetVmParams(vm_id="a", params={"shares": "high", "reservation_bytes": 300 * MiB}), ErrorCode.INVALID_FIELD),
        (SetVmParams(vm_id="a", params={"limit_bytes": 512 * MiB}), ErrorCode.INVALID_FIELD),
        (SetVmParams(vm_id="nope", params={"shares": 5}), ErrorCode.UNKNOWN_VM),
        (SetVmParams(vm_id="a", params={"reservation_bytes": 200 * MiB, "shares": 1}), ErrorCode.ADMISSION_REFUSED),
        (SetManualTarget(vm_id="a", balloon_target_pages=10**6), ErrorCode.INVALID_FIELD),
    ]:
        reply, out = h.control(request)
        assert isinstance(reply, Error) and reply.code == code, reply
        assert out == []
    assert h.core.vms["a"].params == before
    reply, _ = h.control(SetVmParams(vm_id="a", params={"shares": "high", "reservation_bytes": 64 * MiB}))
    assert isinstance(reply, ControlOk) and "shares normal → high" in reply.detail


def test_manual_target_wins_and_auto_returns():
    h = Harness()
    h.send("a", hello("a"))
    assert h.targets(h.tick()) == {"a": 0}  # joins recompute at the next tick
    _reply, out = h.control(SetManualTarget(vm_id="a", balloon_target_pages=5000))
    assert h.targets(out) == {"a": 5000}
    _reply, out = h.control(SetManualTarget(vm_id="a", balloon_target_pages=None))
    assert h.targets(out) == {"a": 0}


def test_admission_refuses_unguaranteeable_reservation():
    h = Harness(vms={"big": VmDefaults(reservation_bytes=390 * MiB)})
    [(_, reply)] = h.send("big", hello("big", memsz=512 * MiB))
    assert isinstance(reply, Error) and reply.code == ErrorCode.ADMISSION_REFUSED
    assert "guaranteed" in reply.detail


def test_statuses_are_not_answered_and_stats_go_by_the_hello_names():
    h = Harness()
    h.send("a", hello("a"))
    assert h.send("a", status(usage=120 * MiB, current=0.25)) == []  # liveness needs no reply
    assert h.core.vms["a"].consumed_pages == 120 * PAGES_PER_MiB
    assert h.core.vms["a"].stat("ws_current_ratio") == 0.25
    assert h.core.vms["a"].stat("never_declared") is None


def test_status_whose_stats_do_not_match_the_hello_is_refused_and_changes_nothing():
    h = Harness()
    h.send("a", hello("a"))
    h.send("a", status(usage=120 * MiB))
    bad = Status(balloon_pages=0, acked_target_seq=0, refused_pages=0, agent_state="idle",
                 stats=(50 * MiB,), ws_touched_ratio=None, ws_method="none", ws_period_ms=0)
    [(_, reply)] = h.send("a", bad)
    assert isinstance(reply, Error) and reply.code == ErrorCode.INVALID_FIELD and "3" in reply.detail
    assert h.core.vms["a"].consumed_pages == 120 * PAGES_PER_MiB
    assert h.core.protocol_errors == {"INVALID_FIELD": 1}


def test_status_snapshot_and_bye():
    h = Harness()
    h.send("a", hello("a"))
    h.send("a", status(usage=120 * MiB, ws=0.5, samples=1))
    reply, _ = h.control(GetStatus())
    assert isinstance(reply, StatusReply)
    [vm] = reply.snapshot["vms"]
    assert vm["consumed_bytes"] == 120 * MiB and vm["active_ratio"] == 0.5
    assert reply.snapshot["host"]["free_bytes"] == 280 * MiB
    h.send("a", __import__("protocol").Bye(reason="test"))
    assert not h.core.vms["a"].alive and h.core.free_pages() == 400 * PAGES_PER_MiB


def test_working_set_fast_up_from_current_period():
    h = Harness()
    h.send("a", hello("a"))
    h.send("a", status(ws=0.1, samples=1))
    h.send("a", status(ws=0.1, samples=1, current=0.9))
    assert h.core.vms["a"].working_set.ratio == pytest.approx(0.5)
