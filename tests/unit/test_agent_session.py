"""The agent's session decisions, sans-IO: messages, readings and a fake clock in, messages
and FakePinner calls out. Each of these used to need root, swap and a real cgroup."""

import itertools
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guestagent.pinning import FakePinner
from guestagent.report import STATS_KEYS
from guestagent.state import Reconnect, Send
from guestagent.wss import Sample
from protocol import (
    Error,
    ErrorCode,
    Hello,
    Lock,
    LockResult,
    PageRanges,
    RangeResult,
    RangeStatus,
    SetTarget,
    Settings,
    Status,
    Unlock,
    UnlockResult,
    Welcome,
)
from tests.unit.agent_harness import PAGE, Agent, Guest, Loopback, MiB, agent_config, reading

SECRET = "Zm9vYmFyYmF6cXV1eDEyMzQ"


def welcome(session="sess", report=1000, timeout=5000, batch=512, sample_period_ms=None, reclaim=False):
    return Welcome(host_session_id=session, report_interval_ms=report, host_timeout_ms=timeout,
                   batch_limit_pages=batch, sample_period_ms=sample_period_ms, reclaim=reclaim, vm_secret=SECRET)


def joined(guest=None, **settings_) -> Agent:
    a = Agent(guest=guest)
    a.turn()
    [hello] = a.sent()
    assert isinstance(hello, Hello)
    a.session.on_message(0, welcome(**settings_), a.now)
    a.take()
    return a


def target(a: Agent, pages: int, seq: int = 1) -> None:
    a.session.on_message(0, SetTarget(target_pages=pages, target_seq=seq), a.now)


def locks(a: Agent) -> list[tuple[int, Lock]]:
    a.turn()
    return [(x.seq, x.message) for x in a.take() if isinstance(x, Send) and isinstance(x.message, Lock)]


def answer(lock: Lock, *statuses: RangeStatus, target_pages=0, target_seq=1) -> LockResult:
    """One status per half of the lock's single range (one status: the whole range)."""
    [(start, count)] = lock.pages.ranges
    if len(statuses) == 1:
        results = (RangeResult(start, count, statuses[0]),)
    else:
        half = count // 2
        results = (RangeResult(start, half, statuses[0]), RangeResult(start + half, count - half, statuses[1]))
    return LockResult(results=results, target_pages=target_pages, target_seq=target_seq)


# ---- targets ------------------------------------------------------------------------------
@pytest.mark.parametrize(("high_water", "seq", "pages", "accepted"), [
    (5, 4, 100, False),  # older seq: stale
    (5, 5, 100, True),  # the same seq again (a lock result carries it): the target holds
    (5, 6, 100, True),
    (5, 5 + 2_000_000, 100, False),  # absurd jump: not this host's
    (5, 0, 100, False),  # 0: the host set no target yet
    (5_000_000_000, 5_000_000_001, 100, True),  # the first seq of a session sets the mark, whatever it is
])
def test_target_seq_verdicts(high_water, seq, pages, accepted):
    a = joined()
    target(a, 50, high_water)
    target(a, pages, seq)
    motion = a.session.motion
    assert (motion.target.pages, motion.target.seq) == ((pages, seq) if accepted else (50, high_water))
    assert a.session.counters.absurd_target_seqs == (seq - high_water > 1_000_000)


def test_absurd_target_seqs_are_counted_each_and_target_clamped_to_capacity():
    a = joined()
    target(a, 50, 1)
    for _ in range(3):
        target(a, 100, 10_000_000)
    assert a.session.counters.absurd_target_seqs == 3 and a.session.motion.target.absurd_seq_logged
    target(a, 10**9, 2)
    assert a.session.motion.target.pages == a.pinner.capacity_pages


def test_traffic_before_the_welcome_is_ignored():
    a = Agent()
    target(a, 1000)
    a.session.on_message(3, LockResult(results=(), target_pages=5, target_seq=9), a.now)
    assert a.session.motion.target.pages == 0 and not a.session.registered


# ---- inflating ----------------------------------------------------------------------------
def test_inflate_pins_one_batch_then_grows_the_window_on_success():
    a = joined()
    target(a, 4096)
    [(seq, lock)] = locks(a)
    assert lock.pages.page_count == 512 and not lock.adopt and a.pinner.calls == [("pin", 512)]
    assert locks(a) == []  # the window (rate 1) is full
    a.session.on_message(seq, answer(lock, RangeStatus.OK, target_pages=4096), a.now)
    assert a.session.motion.rate_batches == 2 and a.session.counters.inflated_pages == 512
    assert len(locks(a)) == 2


@pytest.mark.parametrize(("adopt", "status", "kept"), [
    (False, RangeStatus.OK, True),
    (False, RangeStatus.DUPLICATE, False),  # a fresh lock the host already had: not ours to trust
    (True, RangeStatus.DUPLICATE, True),  # re-adoption after a same-session welcome
    (True, RangeStatus.OK, True),
    (False, RangeStatus.REFUSED, False),
    (False, RangeStatus.INVALID, False),
])
def test_lock_verdicts(adopt, status, kept):
    a = joined()
    batch = a.pinner.pin_batches(512, 512)[0]
    a.session.motion.request(Lock(pages=batch.pages, adopt=adopt), batch, a.now, adopt=adopt)
    [seq] = a.session.motion.pending
    a.take()
    a.session.on_message(seq, answer(Lock(pages=batch.pages, adopt=False), status, target_pages=512), a.now)
    pending = a.session.motion.pending
    assert a.pinner.holds(batch) == kept and not [p for p in pending.values() if p.kind == "lock"]
    assert a.session.counters.refused_pages == (0 if kept else 512)
    # A fresh lock the host already had, of pages the balloon does not hold now: phantoms in
    # the host's ledger, unlocked (the next pin would get the same pages and be refused again).
    phantom = not adopt and status == RangeStatus.DUPLICATE
    assert [p.pages for p in pending.values() if p.kind == "unlock"] == ([batch.pages] if phantom else [])


def test_partly_refused_lock_frees_the_batch_tells_the_taken_half_and_backs_off():
    a = joined()
    target(a, 4096)
    [(seq, lock)] = locks(a)
    a.session.motion.rate_batches = 4
    a.session.on_message(seq, answer(lock, RangeStatus.OK, RangeStatus.REFUSED, target_pages=4096), a.now)
    motion = a.session.motion
    assert a.pinner.held_pages == 0 and a.session.counters.refused_pages == 256
    assert motion.target.refused_pages == 256 and motion.rate_batches == 2
    assert motion.inflate_paused_until_ms == a.now + a.session.pacing.refusal_pause_ms
    [unlock] = [x.message for x in a.take() if isinstance(x, Send)]
    assert isinstance(unlock, Unlock) and unlock.pages.page_count == 256  # the half the host took
    assert locks(a) == []  # paused


def test_pin_failure_halves_the_rate_and_pauses():
    a = joined()
    target(a, 4096)
    a.session.motion.rate_batches = 8
    a.pinner.fail_next_pins = 1
    assert locks(a) == []
    motion = a.session.motion
    assert motion.rate_batches == 4 and motion.inflate_paused_until_ms == a.now + 1000 and a.pinner.held_pages == 0


def test_guest_with_nothing_to_give_refuses_and_reports_the_shortfall():
    # 6 MiB free of 256 and no swap: inside the margin, nothing to give (and no balloon to deflate)
    a = joined(guest=Guest(workload_bytes=250 * MiB, extra={"swap_limit_bytes": 0}))
    target(a, 10_000)
    a.read_guest()
    assert locks(a) == []
    assert a.session.state == "refusing" and a.session.motion.target.refused_pages == 10_000
    a.session.report(None)
    [status] = a.sent()
    assert isinstance(status, Status) and status.agent_state == "refusing" and status.refused_pages == 10_000


@settings(max_examples=60, deadline=None)
@given(held_batches=st.integers(0, 8), leaving=st.integers(0, 8), target_pages=st.integers(0, 8 * 512))
def test_refused_pages_in_a_status_is_never_negative(held_batches, leaving, target_pages):
    """Pages on their way out (unlock sent) are not the guest's to refuse (96ddeb1: a negative
    count is an invalid status, which once killed the agent mid-experiment)."""
    a = joined(guest=Guest(workload_bytes=240 * MiB))
    motion = a.session.motion
    batches = a.pinner.pin_batches(held_batches * 512, 512) if held_batches else []
    for batch in batches[:leaving]:
        motion.request(Unlock(pages=batch.pages), batch, a.now)
    motion.target.pages, motion.rate_batches = target_pages, 64
    a.read_guest()
    a.session.tick(a.now)
    a.session.report(None)
    [status] = [m for m in a.sent() if isinstance(m, Status)]
    assert 0 <= status.refused_pages <= a.pinner.capacity_pages


# ---- deflating ----------------------------------------------------------------------------
def test_deflate_frees_first_then_unlocks_outside_reclaim_mode():
    a = joined()
    for batch in a.pinner.pin_batches(2048, 512):
        a.session.motion.request(Lock(pages=batch.pages, adopt=False), batch, a.now)
    for seq in list(a.session.motion.pending):
        a.session.on_message(seq, LockResult(results=(), target_pages=2048, target_seq=1), a.now)
    a.take()
    target(a, 512, 2)
    a.session.tick(a.now)
    assert a.pinner.held_pages == 512  # freed before the host answered
    unlocks = [x.message for x in a.take() if isinstance(x, Send)]
    assert sum(u.pages.page_count for u in unlocks) == 1536 and all(isinstance(u, Unlock) for u in unlocks)


def test_reclaim_mode_drops_backing_and_deflates_only_on_the_hosts_word():
    a = joined(reclaim=True)
    target(a, 512)
    [(seq, lock)] = locks(a)
    a.session.on_message(seq, answer(lock, RangeStatus.OK, target_pages=512), a.now)
    assert a.pinner.calls[-1] == ("drop", 512) and a.pinner.dropped_pages == 512
    target(a, 0, 2)
    a.session.tick(a.now)
    [(unlock_seq, unlock)] = [(x.seq, x.message) for x in a.take() if isinstance(x, Send)]
    assert isinstance(unlock, Unlock) and a.pinner.held_pages == 512  # still held until the host agrees
    kept = UnlockResult(results=(RangeResult(*unlock.pages.ranges[0], RangeStatus.INVALID),),
                        target_pages=0, target_seq=2)
    a.session.on_message(unlock_seq, kept, a.now)
    assert a.pinner.held_pages == 512  # the host kept them: so does the balloon
    a.session.tick(a.now)
    [(unlock_seq, unlock)] = [(x.seq, x.message) for x in a.take() if isinstance(x, Send)]
    ok = UnlockResult(results=(RangeResult(*unlock.pages.ranges[0], RangeStatus.OK),), target_pages=0, target_seq=2)
    a.session.on_message(unlock_seq, ok, a.now)
    assert a.pinner.held_pages == 0 and a.pinner.dropped_pages == 0


def test_working_set_cap_counts_memory_handed_back_in_reclaim_mode():
    a = joined(guest=Guest(limit_bytes=256 * MiB), reclaim=True)
    a.session.sampling.last_ws = Sample(ratio=0.25, method="referenced", period_ms=10_000)
    cap_before = a.session.working_set_cap()
    batch = a.pinner.pin_batches(8192, 8192)[0]
    a.pinner.drop_backing(batch)
    a.session.pressure.last_reading = reading(limit_bytes=256 * MiB - 8192 * PAGE)  # the host lowered it
    assert a.session.working_set_cap() == cap_before
    a.session.sampling.last_ws = Sample(ratio=0.9, method="active_lru", period_ms=10_000)
    assert a.session.working_set_cap() is None  # the active-LRU fallback never caps


# ---- pressure -----------------------------------------------------------------------------
@pytest.mark.parametrize(("change", "reason_part"), [
    ({"oom_kill_events": 1}, "oom_kill"),
    ({"oom_events": 1}, "oom event"),
    ({"high_events": 1}, "memory.high"),
    ({"psi_full_avg10": 50.0}, "PSI"),
])
def test_pressure_signals_deflate_at_once_and_pause(change, reason_part, caplog):
    a = joined()
    batches = a.pinner.pin_batches(8192, 512)
    a.read_guest()
    a.now += 100
    a.guest.extra = change
    a.read_guest()
    assert a.session.counters.pressure_deflates == 1 and reason_part in caplog.text
    assert a.pinner.held_pages <= 8192 - 2048 and a.session.state == "pressure_deflate"
    unlocks = [x.message for x in a.take() if isinstance(x, Send)]
    assert sum(u.pages.page_count for u in unlocks) == 8192 - a.pinner.held_pages
    motion = a.session.motion
    assert motion.inflate_paused_until_ms >= a.now + a.session.pacing.pressure_pause_ms
    assert all(a.pinner.holds(b) for b in batches[: a.pinner.held_pages // 512])  # freed from the top


def test_pressure_while_unregistered_is_told_after_a_same_session_welcome_only():
    for session, told in (("sess", 2048), ("other", 0)):
        a = joined()
        a.pinner.pin_batches(8192, 512)
        a.session.on_message(0, Error(code=ErrorCode.NOT_REGISTERED, detail="x", in_reply_to=None), a.now)
        a.read_guest()
        a.now += 100
        a.guest.extra = {"oom_kill_events": 1}
        a.read_guest()
        assert [x for x in a.take() if isinstance(x, Send)] == []  # no host to tell now
        a.session.on_message(0, welcome(session=session), a.now)
        sent = [x.message for x in a.take() if isinstance(x, Send)]
        unlocks = [m for m in sent if isinstance(m, Unlock)]
        assert sum(u.pages.page_count for u in unlocks) == told
        first_adopt = next(i for i, m in enumerate(sent) if isinstance(m, Lock))
        assert all(isinstance(m, Unlock) for m in sent[:first_adopt])  # unlocks go first


# ---- registration -------------------------------------------------------------------------
@pytest.mark.parametrize(("code", "registered", "hello_at_once"), [
    (ErrorCode.NOT_REGISTERED, False, True),
    # Only an answer to a hello repeated before its welcome came: the host changed nothing.
    (ErrorCode.CONFLICT, True, False),
    (ErrorCode.ADMISSION_REFUSED, True, False),
    (ErrorCode.INVALID_FIELD, True, False),
    (ErrorCode.LIMIT_EXCEEDED, True, False),
])
def test_host_error_codes(code, registered, hello_at_once):
    a = joined()
    target(a, 2048)
    [(seq, _lock)] = locks(a)
    a.session.on_message(0, Error(code=code, detail="x", in_reply_to=seq), a.now)
    assert a.session.registered == registered and a.session.counters.protocol_errors == 1
    assert seq not in a.session.motion.pending
    a.session.tick(a.now)
    hellos = [m for m in a.sent() if isinstance(m, Hello)]
    assert bool(hellos) == hello_at_once
    if hellos:
        assert hellos[0].vm_secret == SECRET and hellos[0].last_host_session_id == "sess"


def test_welcome_floors_and_settings():
    a = Agent()
    a.session.on_message(0, welcome(report=10, timeout=20, sample_period_ms=100, reclaim=True), a.now)
    s = a.session
    assert s.counters.floored_welcomes == 1 and s.sampling.report_interval_ms == 200
    assert s.sampling.host_timeout_ms == 1000 and s.sampling.ws_period_ms == 1000 and s.motion.reclaim


@pytest.mark.parametrize(("session", "target_after"), [("sess", 4096), ("new", 1024)])
def test_a_new_host_session_takes_the_held_balloon_as_its_target(session, target_after):
    a = joined()
    target(a, 4096, 7)
    a.pinner.pin_batches(1024, 512)
    a.session.on_message(0, welcome(session=session), a.now)
    assert a.session.motion.target.pages == target_after
    adopts = [x.message for x in a.take() if isinstance(x, Send)]
    assert [m.adopt for m in adopts] == [True, True] and sum(m.pages.page_count for m in adopts) == 1024


def test_readoption_keeps_the_window_and_skips_batches_freed_meanwhile():
    a = Agent(guest=Guest(limit_bytes=1024 * MiB))
    a.pinner.pin_batches(100 * 512, 512)
    a.session.on_message(0, welcome(), a.now)
    motion = a.session.motion
    assert len(motion.pending) == 32 and len(motion.outbox) == 68  # max_rate_batches in flight
    for batch in a.pinner.batches_from_top()[:10]:
        a.pinner.release(batch)
    for seq in list(motion.pending):
        a.session.on_message(seq, LockResult(results=(), target_pages=0, target_seq=0), a.now)
    a.take()
    sent = []
    for _ in range(3):
        a.session.tick(a.now)
        sent += [x.message for x in a.take() if isinstance(x, Send)]
        for seq in list(motion.pending):
            a.session.on_message(seq, LockResult(results=(), target_pages=0, target_seq=0), a.now)
    held = {b.pages for b in a.pinner.batches}
    assert len(sent) == 58 and not motion.outbox and all(m.pages in held for m in sent)  # 10 freed: never sent


def test_unreachable_host_means_a_fresh_connection_and_hello_after_its_timeout():
    a = joined()
    a.session.on_send(False, a.now)
    a.now += 5000
    a.session.tick(a.now)
    assert a.session.registered
    a.now += 1
    a.session.tick(a.now)
    actions = a.take()
    assert isinstance(actions[0], Reconnect) and isinstance(actions[1].message, Hello)
    assert a.session.state == "host_lost" and not a.session.registered
    a.session.on_frame(b"\x00garbage", a.now)
    assert a.session.counters.protocol_errors == 1 and a.session.reg.unreachable_since_ms is None


def test_a_frame_or_a_delivered_send_proves_the_host_is_there():
    a = joined()
    a.session.on_send(False, a.now)
    a.session.on_send(False, a.now + 100)
    assert a.session.reg.unreachable_since_ms == a.now  # from the first failure
    a.session.on_send(True, a.now + 200)
    a.now += 10_000
    a.session.tick(a.now)
    assert a.session.registered and not [x for x in a.take() if isinstance(x, Reconnect)]


def test_requests_unanswered_for_two_host_timeouts_expire_into_a_rehello():
    a = joined()
    target(a, 2048)
    locks(a)
    a.now += 10_000
    a.session.tick(a.now)
    assert a.session.counters.expired_requests == 0
    a.now += 1
    a.session.tick(a.now)
    actions = a.take()
    assert a.session.counters.expired_requests == 1 and isinstance(actions[0], Reconnect)
    assert isinstance(actions[1].message, Hello) and actions[1].message.held_pages == 512


def test_hello_backoff_doubles_to_five_seconds():
    a = Agent()
    sent_at = []
    for _ in range(30_000 // 50):
        a.now += 50
        a.session.tick(a.now)
        if a.sent():
            sent_at.append(a.now)
    gaps = [b - a_ for a_, b in itertools.pairwise(sent_at)]
    assert gaps[:6] == [100, 200, 400, 800, 1600, 3200] and set(gaps[6:]) == {5000}


# ---- timers, reports ----------------------------------------------------------------------
def test_poll_timeout():
    a = Agent()
    assert a.session.poll_timeout_ms(a.now) == 0  # the first hello and check are due
    a = joined()
    a.session.due_check(a.now)
    a.session.due_report(a.now)
    assert a.session.poll_timeout_ms(a.now) == 100  # the next check
    target(a, 2048)
    assert a.session.poll_timeout_ms(a.now) == 0  # somewhere to go, room in the window
    a.session.motion.inflate_paused_until_ms = a.now + 500
    assert a.session.poll_timeout_ms(a.now) == 100


def test_alarm_threshold_and_wakeup():
    a = joined()
    assert a.session.alarm_threshold_bytes(reading(limit_bytes=None)) is None
    assert a.session.alarm_threshold_bytes(reading(limit_bytes=256 * MiB)) == 256 * MiB - 2 * 24 * MiB
    a.read_guest()
    a.session.due_check(a.now)
    a.session.on_alarm()
    assert a.session.sampling.next_check_ms == a.now + 5


def test_report_carries_the_hello_names_the_sample_and_the_workload():
    a = joined()
    target(a, 512, 3)
    a.session.end_ws_period(Sample(ratio=0.125, method="referenced", period_ms=10_000))
    a.session.report(Sample(ratio=0.5, method="referenced", period_ms=400), {"workload_touches_per_s": 7})
    [status] = a.sent()
    stats = dict(zip(STATS_KEYS, status.stats, strict=True))
    assert stats["workload_touches_per_s"] == 7 and stats["limit_bytes"] is not None  # informational
    assert not {"usage_bytes", "ws_samples", "ws_current_ratio"} & set(STATS_KEYS)  # typed fields instead
    assert status.usage_bytes == 60 * MiB and status.acked_target_seq == 3
    assert (status.ws_touched_ratio, status.ws_samples, status.ws_current_ratio, status.ws_method) == \
        (0.125, 1, 0.5, "referenced")


def test_a_report_before_any_reading_or_sample_says_unknown():
    a = Agent()
    a.session.pressure.last_reading = None
    a.session.on_message(0, welcome(), a.now)
    a.take()
    a.session.report(None)
    [status] = a.sent()
    assert isinstance(status, Status)
    assert (status.usage_bytes, status.ws_touched_ratio, status.ws_samples, status.ws_current_ratio,
            status.ws_method) == (None, None, 0, None, "none")


@pytest.mark.parametrize(("pushed", "applied", "floored"), [(5_000, 5_000, 0), (999, 1_000, 1), (10, 1_000, 1),
                                                             (86_400_000, 86_400_000, 0)])
def test_pushed_settings_change_the_sample_period_within_its_floor(pushed, applied, floored):
    a = joined()
    a.session.on_message(0, Settings(sample_period_ms=pushed), a.now)
    s = a.session.sampling
    assert s.ws_period_ms == applied and a.session.counters.floored_welcomes == floored
    assert s.next_ws_ms <= a.now + applied  # the running period ends by one new period from now


def test_settings_before_a_welcome_are_stale_traffic():
    a = Agent()
    before = a.session.sampling.ws_period_ms
    a.session.on_message(0, Settings(sample_period_ms=2_000), a.now)
    assert a.session.sampling.ws_period_ms == before


def test_shutdown_releases_and_says_bye_only_when_registered():
    a = Agent()
    a.pinner.pin_batches(1024, 512)
    assert a.session.shutdown() == 1024 and a.sent() == []
    a = joined()
    a.pinner.pin_batches(1024, 512)
    assert a.session.shutdown() == 1024 and [m.kind for m in a.sent()] == ["bye"]


# ---- the fake pinner and the whole loop ---------------------------------------------------
def test_fake_pinner_first_fit_and_top_shrink():
    p = FakePinner(4096)
    b = p.pin_batches(2048, 512)
    p.release(b[1])
    [again] = p.pin_batches(256, 256)
    assert again.offset_pages == 512  # the first hole
    p.release(b[3])
    p.release(b[2])
    [top] = p.pin_batches(1024, 1024)
    assert top.offset_pages == 768  # the holes at the top merged back into the free top
    with pytest.raises(Exception, match="capacity"):
        p.pin_batches(4096, 512)
    assert p.held_pages == 512 + 256 + 1024


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["target", "pressure", "drop", "run"]), st.integers(0, 12_000)),
                min_size=1, max_size=8))
def test_host_and_agent_books_agree_whatever_happens(events):
    """Any mix of targets, pressure and lost replies: once the loop settles, the host's ledger
    and the balloon hold the same pages, the window never overflows, no status is invalid."""
    lb = Loopback(Agent(agent_config(), Guest()))
    lb.run(50)
    pressure = 0
    for kind, value in events:
        if kind == "target":
            lb.set_target(value)
        elif kind == "pressure":
            pressure += 1
            lb.agent.guest.extra = {"oom_kill_events": pressure}
        elif kind == "drop":
            lb.drop_replies = True
            lb.run(200)
            lb.drop_replies = False
        lb.run(300)
        assert len(lb.session.motion.pending) <= lb.session.pacing.max_rate_batches
    lb.run(25_000, step_ms=50)  # settles: expired requests re-registered, pauses over
    assert lb.session.registered and lb.host_ledger_pages() == lb.agent.pinner.held_pages
    assert all(m.refused_pages >= 0 for m in lb.to_host if isinstance(m, Status))
    assert lb.agent.pinner.held_pages <= lb.agent.pinner.capacity_pages


def test_pageranges_of_fake_batches_are_vpns_from_the_base():
    p = FakePinner(1024, base_vpn=1000)
    [b] = p.pin_batches(10, 10)
    assert b.pages == PageRanges(((1000, 10),)) and p.page_kind == "vpn"


def test_the_session_is_sans_io():
    """No zmq, psutil, mmap or ctypes behind the session: those stay in client.py and balloon.py."""
    code = ("import sys, guestagent.session, guestagent.motion, guestagent.state, guestagent.pinning\n"
            "print(sorted(m for m in ('zmq', 'psutil', 'mmap', 'ctypes', 'guestagent.client', 'guestagent.balloon',"
            " 'guestagent.alarm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_a_refused_hello_is_counted_and_said_once_per_code(caplog):
    a = Agent()
    a.turn()
    [hello] = a.sent()
    assert isinstance(hello, Hello) and not a.session.registered
    with caplog.at_level("WARNING", logger="guestagent.session"):
        for code in (ErrorCode.CONFLICT, ErrorCode.CONFLICT, ErrorCode.UNAUTHORIZED):
            a.session.on_message(0, Error(code=code, detail="no", in_reply_to=None), a.now)
    said = [r.getMessage() for r in caplog.records if "refused us" in r.getMessage()]
    assert a.session.counters.protocol_errors == 3 and not a.session.registered
    assert len(said) == 2 and "CONFLICT" in said[0] and "UNAUTHORIZED" in said[1]
    a.session.on_message(0, welcome(), a.now)  # registered: a later refusal is news again
    assert a.session.reg.last_refusal is None
