"""hostd's core driven by frames and a fake clock: no sockets."""

import pytest

from hostd.config import HostConfig, VmParams
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


STATS_KEYS = ("swap_used_bytes", "major_faults", "workload_touches_per_s")  # informational only
CONTROL_TOKEN = "t0ken-for-unit-tests-0123456789"


def hello(vm_id, memsz=256 * MiB, held=0, session=None):
    return Hello(vm_id=vm_id, memsz_bytes=memsz, agent_version="t", page_kind="vpn", supports_2m=False,
                 cgroup_version=2, max_batch_pages=512, held_pages=held, last_host_session_id=session,
                 stats_keys=STATS_KEYS)


def status(balloon_pages=0, usage=100 * MiB, ws=None, samples=0, state="idle", current=None,
           stats=(None, None, None), refused=0):
    return Status(balloon_pages=balloon_pages, acked_target_seq=0, refused_pages=refused, agent_state=state,
                  usage_bytes=usage, ws_touched_ratio=ws, ws_samples=samples, ws_current_ratio=current,
                  ws_method="referenced", stats=stats)


class Harness:
    def __init__(self, **config):
        config.setdefault("host_memory_bytes", 400 * MiB)
        config.setdefault("report_interval_ms", 10)  # settle window (7 reports) ends at once
        config.setdefault("balance_period_ms", 15_000)
        config.setdefault("batch_limit_pages", 1 << 20)  # whole balloons in one lock, for short tests
        self.core = HostCore(HostConfig(**config), "sess", now_ms=0, control_token=CONTROL_TOKEN)
        self.now = 0
        self.seq = 0

    def send(self, vm_id, message):
        self.seq += 1
        out = self.core.handle_agent(vm_id.encode(), encode(message, self.seq), self.now)
        return [(identity.decode(), decode(frame).message) for identity, frame in out]

    def control(self, message, operator=True):
        reply, out = self.core.handle_control(encode(message, 1), self.now, operator)
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
    assert h.core.vms["a"].targets.balloon_target_pages == 1000  # adopted until the policy decides
    lock = h.send("a", Lock(pages=PageRanges(((0, 1000),)), adopt=True))
    assert [r.status for r in lock[0][1].results] == [RangeStatus.OK]


def test_not_registered_and_bound_to_the_connection():
    h = Harness()
    [(_, reply)] = h.send("ghost", status())
    assert isinstance(reply, Error) and reply.code == ErrorCode.NOT_REGISTERED
    out = h.core.handle_agent(b"\x00conn1", encode(hello("a"), 1), 0)  # routing ids are the ROUTER's
    assert isinstance(decode(out[0][1]).message, Welcome)
    [(_, reply)] = h.send("a", status())  # a routing id that names the vm is not its connection
    assert isinstance(reply, Error) and reply.code == ErrorCode.NOT_REGISTERED
    out = h.core.handle_agent(b"\x00conn1", encode(status(), 2), 0)
    assert out == [] and h.core.vms["a"].status is not None


def test_conflict_then_accepted_after_loss():
    h = Harness(report_interval_ms=1000)
    h.send("a", hello("a"))
    [(_, reply)] = h.send("a", hello("a"))  # a second agent claiming the id, no session
    assert reply.code == ErrorCode.CONFLICT
    h.now = 3_500
    h.tick()
    assert "a" not in h.core.vms  # lost before it ever reported: forgotten at once
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
    cap = h.core.vms["a"].targets.balloon_max_pages  # 65 % of memsz
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
    h = Harness(vms={"big": VmParams(reservation_bytes=390 * MiB)})
    [(_, reply)] = h.send("big", hello("big", memsz=512 * MiB))
    assert isinstance(reply, Error) and reply.code == ErrorCode.ADMISSION_REFUSED
    assert "guaranteed" in reply.detail


def test_statuses_are_not_answered_and_stats_go_by_the_hello_names():
    h = Harness()
    h.send("a", hello("a"))
    assert h.send("a", status(usage=120 * MiB, current=0.25, stats=(5 * MiB, 7, 1.5))) == []  # no reply
    vm = h.core.vms["a"]
    assert vm.consumed_pages == 120 * PAGES_PER_MiB  # the typed usage_bytes
    assert vm.stat("swap_used_bytes") == 5 * MiB and vm.stat("workload_touches_per_s") == 1.5  # informational
    assert vm.stat("never_declared") is None and vm.stat("usage_bytes") is None


def test_the_policy_reads_the_typed_fields_not_stats_of_the_same_names():
    h = Harness()
    h.send("a", Hello(vm_id="a", memsz_bytes=256 * MiB, agent_version="t", page_kind="vpn", supports_2m=False,
                      cgroup_version=2, max_batch_pages=512, held_pages=0, last_host_session_id=None,
                      stats_keys=("usage_bytes", "ws_samples", "ws_current_ratio")))
    h.send("a", status(usage=None, ws=0.5, samples=0, current=None, stats=(200 * MiB, 5, 0.9)))
    vm = h.core.vms["a"]
    assert vm.consumed_pages == 0 and vm.working_set.samples == 0  # the stats of those names count for nothing
    h.send("a", status(usage=50 * MiB, ws=0.5, samples=1, current=0.9, stats=(200 * MiB, 5, 0.1)))
    assert vm.consumed_pages == 50 * PAGES_PER_MiB and vm.working_set.samples == 1
    assert vm.working_set.fast_current > vm.working_set.fast == 0.5  # the typed running period


@pytest.mark.parametrize("usage", [256 * MiB + 4096, 2**50])  # valid on the wire, more than the vm has
def test_typed_usage_is_capped_at_the_vms_memsz(usage):
    h = Harness()
    h.send("a", hello("a", memsz=256 * MiB))
    assert h.send("a", status(usage=usage)) == []
    assert h.core.vms["a"].consumed_pages == 256 * PAGES_PER_MiB


@pytest.mark.parametrize(("state", "refused", "refusing"), [("idle", 0, False), ("refusing", 0, True),
                                                             ("idle", 10, True), ("inflating", 1, True)])
def test_the_refusal_is_read_from_the_typed_fields(state, refused, refusing):
    h = Harness()
    h.send("a", hello("a"))
    h.send("a", status(state=state, refused=refused))
    assert h.core.vms["a"].agent.refusing is refusing


def test_status_whose_stats_do_not_match_the_hello_is_refused_and_changes_nothing():
    h = Harness()
    h.send("a", hello("a"))
    h.send("a", status(usage=120 * MiB))
    bad = status(usage=50 * MiB, stats=(50 * MiB,))
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


# ---- host-level reclamation: vms known by their cgroup -------------------------------------
def test_a_guest_without_an_agent_is_swapped_by_the_host_and_given_its_limit_back():
    h = Harness(host_memory_bytes=600 * MiB, vm_cgroups={"plain": "lab/plain", "busy": "lab/busy"},
                vswap_step_bytes=64 * MiB)
    h.send("busy", hello("busy", memsz=512 * MiB))
    h.send("busy", status(usage=300 * MiB, ws=1.0, samples=1))
    h.core.observe_cgroup("plain", 400 * MiB, 0, 512 * MiB, h.now)  # no agent: known by its cgroup
    assert h.core.vms["plain"].has_agent is False and h.core.vms["plain"].memsz_pages == 512 * PAGES_PER_MiB
    assert h.core.vms["plain"].agent is None  # no fabricated hello: an agentless vm has no agent link
    h.tick()
    assert h.core.state in ("hard", "low")  # 700 MiB held on a 600 MiB host
    plain = h.core.vms["plain"]
    # no balloon: all host swap
    assert plain.targets.balloon_target_pages == 0 and h.core.registry.outcome(plain).swap_target_pages > 0
    actions = h.core.host_actions(h.now)
    assert ("plain", "lab/plain", "limit", 336 * MiB) in actions  # a step below the 400 MiB it holds
    assert all(vm != "busy" for vm, *_ in actions if _[1] == "limit")  # no cgroup configured for busy
    # Pressure eases (the guest was paged out): the limit climbs back a step a second.
    h.core.observe_cgroup("plain", 100 * MiB, 300 * MiB, 512 * MiB, h.now)
    h.control(SetHostParams(params={"host_memory_bytes": 4096 * MiB}))
    h.tick()
    limits = []
    for _ in range(6):
        limits += [a[3] for a in h.core.host_actions(h.now) if a[2] == "limit"]
    assert limits == [400 * MiB, 464 * MiB, None]  # None: the cgroup's own limit restored
    assert h.core.snapshot(h.now)["vms"][1]["swap_current_bytes"] == 300 * MiB


def test_an_agent_lost_hands_its_guest_to_host_swap_and_a_new_agent_takes_it_back():
    h = Harness(report_interval_ms=1000, vm_cgroups={"a": "lab/a"})
    h.send("a", hello("a"))
    h.core.observe_cgroup("a", 200 * MiB, 0, 256 * MiB, h.now)
    h.now = 3_500
    h.tick()
    vm = h.core.vms["a"]
    assert vm.alive and not vm.has_agent and vm.consumed_pages == 200 * PAGES_PER_MiB
    assert h.core.snapshot(h.now)["vms"][0]["agent_state"] == "no_agent"
    [(_, reply)] = h.send("a", status())
    assert reply.code == ErrorCode.NOT_REGISTERED  # a status is no hello
    assert isinstance(h.send("a", hello("a"))[0][1], Welcome)  # not a CONFLICT: nobody else holds it
    assert h.core.vms["a"].has_agent and h.core.registry.host_targets.get("a") == "lab/a"


def test_low_state_blocks_the_guest_above_target_and_thaws_it():
    h = Harness(host_memory_bytes=600 * MiB, vm_cgroups={"plain": "lab/plain"}, block_max_ms=10_000)
    h.core.observe_cgroup("plain", 597 * MiB, 0, 1024 * MiB, h.now)
    h.tick()
    assert h.core.state == "low"
    assert ("plain", "lab/plain", "freeze", None) in h.core.host_actions(h.now)
    h.now += 1_000
    assert not [a for a in h.core.host_actions(h.now) if a[2] in ("freeze", "thaw")]  # still blocked
    h.core.observe_cgroup("plain", 300 * MiB, 290 * MiB, 1024 * MiB, h.now)  # paged out: free recovers
    h.tick()
    assert ("plain", "lab/plain", "thaw", None) in h.core.host_actions(h.now)
    assert h.core.vms["plain"].host.frozen_since_ms is None


def test_a_failed_backend_action_is_reported_and_undone_in_the_record():
    h = Harness(host_memory_bytes=600 * MiB, vm_cgroups={"plain": "lab/plain"})
    h.core.observe_cgroup("plain", 580 * MiB, 0, 1024 * MiB, h.now)
    h.tick()
    actions = h.core.host_actions(h.now)
    assert any(a[2] == "limit" for a in actions)
    h.core.host_action_failed("plain", "limit", "permission denied writing x: this needs root", h.now)
    vm = h.core.vms["plain"]
    assert vm.host.vswap_limit_pages is None and "permission denied" in vm.host.backend_error
    assert h.core.counters["host_action_failures"] == 1


def test_reclaim_mode_lowers_the_limit_by_the_balloon_and_gives_it_back():
    h = Harness(vm_cgroups={"rec": "lab/rec"}, reclaim_mode=True)
    [(_, welcome)] = h.send("rec", hello("rec", memsz=512 * MiB))  # vpn page numbers
    assert welcome.reclaim is True
    [(_, other)] = h.send("plain", hello("plain"))
    assert other.reclaim is False  # no cgroup to lower: its memory would stay the guest's
    h.core.observe_cgroup("rec", 200 * MiB, 0, 512 * MiB, h.now)
    h.core.vms["rec"].targets.balloon_target_pages = 64 * PAGES_PER_MiB  # as a set_target would allow
    h.send("rec", Lock(pages=PageRanges(((0, 64 * PAGES_PER_MiB),)), adopt=False))
    limits = [a[3] for a in h.core.host_actions(h.now) if a[2] == "limit"]
    assert limits == [448 * MiB]  # its own 512 MiB less the 64 MiB balloon, at once
    h.send("rec", Unlock(pages=PageRanges(((0, 64 * PAGES_PER_MiB),))))
    assert [a[3] for a in h.core.host_actions(h.now) if a[2] == "limit"] == [None]  # all back
