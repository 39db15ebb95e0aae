"""HostCore ↔ AgentSession in memory: both real implementations, wired by encoded frames (the
protocol codec both ways), a fake clock and a FakePinner. No sockets, no root, no cgroup."""

import itertools

from protocol import (
    Bye,
    Error,
    ErrorCode,
    Hello,
    Lock,
    LockResult,
    RangeStatus,
    SetTarget,
    Settings,
    Status,
    Unlock,
    UnlockResult,
    Welcome,
    decode,
    encode,
)
from tests.unit.agent_harness import Agent, Loopback, MiB, agent_config


def registered(**host_config):
    lb = Loopback(**host_config)
    lb.run(50)
    assert lb.session.registered
    return lb


def inflated(pages=10_000, **host_config):
    lb = registered(**host_config)
    lb.set_target(pages)
    lb.run(3_000)
    assert lb.agent.pinner.held_pages == pages
    return lb


def test_hello_welcome_then_unanswered_reports():
    lb = Loopback()
    lb.run(50)
    hello = lb.to_host[0]
    assert isinstance(hello, Hello) and hello.vm_id == "a" and hello.vm_secret is None
    assert hello.last_host_session_id is None and hello.held_pages == 0
    welcome = lb.to_agent[0]
    assert isinstance(welcome, Welcome) and welcome.host_session_id == "sess"
    assert lb.session.reg.host_session == "sess" and lb.session.reg.vm_secret == welcome.vm_secret
    assert lb.session.sampling.ws_period_ms == 10_000  # the host's sample period governs
    lb.run(2_100)
    statuses = [m for m in lb.to_host if isinstance(m, Status)]
    assert len(statuses) >= 2 and all(s.agent_state == "idle" for s in statuses)
    vm = lb.vm()
    assert vm["alive"] and vm["consumed_bytes"] == 60 * MiB
    assert not [m for m in lb.to_agent if isinstance(m, Error)]


def test_set_target_inflates_with_locks_each_answered_by_the_host():
    lb = inflated(10_000)
    locks = [m for m in lb.to_host if isinstance(m, Lock)]
    assert locks and not any(lock.adopt for lock in locks)
    assert sum(lock.pages.page_count for lock in locks) == 10_000
    assert all(len(lock.pages.ranges) >= 1 and lock.pages.page_count <= 512 for lock in locks)
    results = [m for m in lb.to_agent if isinstance(m, LockResult)]
    assert len(results) == len(locks) and all(r.status == RangeStatus.OK for m in results for r in m.results)
    assert lb.host_ledger_pages() == 10_000
    assert lb.session.counters.inflated_pages == 10_000 and not lb.session.motion.pending
    assert lb.session.motion.rate_batches > 1  # the adaptive rate grew on success
    lb.run(1_100)
    assert lb.vm()["balloon_bytes"] == 10_000 * 4096  # the report says so too
    assert lb.session.state == "idle"


def test_deflate_frees_then_tells_the_host():
    lb = inflated(10_000)
    lb.set_target(2_000)
    lb.run(1_000)
    assert lb.agent.pinner.held_pages == 2_000 and lb.host_ledger_pages() == 2_000
    unlocks = [m for m in lb.to_host if isinstance(m, Unlock)]
    assert unlocks and all(r.status in (RangeStatus.OK, RangeStatus.UNKNOWN)
                           for m in lb.to_agent if isinstance(m, UnlockResult) for r in m.results)
    lb.set_target(0)
    lb.run(500)
    assert lb.agent.pinner.held_pages == 0 and lb.host_ledger_pages() == 0


def test_stale_target_seq_is_ignored():
    lb = inflated(4_000)
    seq = lb.session.motion.target.seq
    lb.session.on_frame(encode(SetTarget(target_pages=0, target_seq=seq - 1), 99), lb.agent.now)
    lb.run(300)
    assert lb.agent.pinner.held_pages == 4_000


def test_host_lost_then_back_rehello_with_the_vm_secret_and_readopt():
    lb = inflated(6_000)
    secret = lb.session.reg.vm_secret
    old_identity = lb.identity
    lb.host_down = True
    lb.run(7_000, step_ms=50)  # > the welcome's host timeout (5 reports)
    assert not lb.session.registered and lb.identity != old_identity  # a fresh connection
    assert lb.agent.pinner.held_pages == 6_000  # inside the grace period: the balloon stays
    sent_before = len(lb.to_host)
    lb.host_down = False
    lb.run(2_000)
    assert lb.session.registered
    [hello] = [m for m in lb.to_host[sent_before:] if isinstance(m, Hello)]
    assert hello.vm_secret == secret and hello.last_host_session_id == "sess" and hello.held_pages == 6_000
    adopts = [m for m in lb.to_host[sent_before:] if isinstance(m, Lock) and m.adopt]
    assert sum(lock.pages.page_count for lock in adopts) == 6_000
    assert lb.host_ledger_pages() == 6_000 and lb.agent.pinner.held_pages == 6_000


def test_another_agent_without_the_secret_gets_conflict():
    lb = inflated(1_000)
    impostor = Agent(agent_config())
    impostor.turn()
    [hello] = impostor.sent()
    [(_identity, frame)] = lb.core.handle_agent(b"\x00impostor", encode(hello, 1), lb.agent.now)
    reply = decode(frame).message
    assert isinstance(reply, Error) and reply.code == ErrorCode.CONFLICT
    impostor.session.on_frame(frame, impostor.now)  # not registered: nothing to undo, hello again later
    assert not impostor.session.registered and impostor.session.reg.next_hello_ms == impostor.now + 100
    lb.run(500)
    assert lb.session.registered and lb.host_ledger_pages() == 1_000


def test_host_gone_past_grace_deflates_gradually():
    lb = inflated(4_000)
    lb.host_down = True
    down_at = lb.agent.now
    while lb.agent.pinner.held_pages == 4_000:
        lb.run(50, step_ms=50)
        assert lb.agent.now - down_at < 20_000, "never deflated without its host"
    assert lb.agent.now - down_at > 5_000 + 2_000  # the host timeout, then the grace (2 s in agent_config)
    assert 4_000 - 512 <= lb.agent.pinner.held_pages < 4_000  # gradually: one batch at a time
    lb.run(2_000, step_ms=50)
    assert lb.agent.pinner.held_pages == 0
    sent_before = len(lb.to_host)
    lb.host_down = False
    lb.run(5_100)  # the hello backoff reached its 5 s cap while the host was gone
    assert lb.session.registered
    after = lb.to_host[sent_before:]
    assert isinstance(after[0], Hello) and after[0].held_pages == 0
    assert sum(m.pages.page_count for m in after if isinstance(m, Unlock)) == 4_000  # told after the welcome
    # The host had dropped the ledger when it lost the vm; the manual target still holds, so
    # the balloon grows back, page for page in both books.
    assert lb.agent.pinner.held_pages == 4_000 and lb.host_ledger_pages() == 4_000


def test_pressure_deflates_at_once_and_pauses_inflation():
    lb = inflated(10_000)
    lb.agent.guest.extra = {"oom_kill_events": 1}
    lb.run(200)
    counters = lb.session.counters
    assert counters.pressure_deflates == 1
    held = lb.agent.pinner.held_pages
    assert held <= 10_000 - 2_500  # a quarter of the balloon at least
    assert lb.host_ledger_pages() == held  # the unlocks followed the frees
    assert lb.session.state == "pressure_deflate"
    lb.run(1_100)
    assert [m for m in lb.to_host if isinstance(m, Status)][-1].agent_state == "pressure_deflate"
    lb.run(2_000)
    assert lb.agent.pinner.held_pages == held  # paused: no re-inflation straight back


def test_unanswered_requests_expire_into_a_rehello_that_readopts():
    lb = registered()
    lb.set_target(4_000)
    lb.drop_replies = True
    lb.run(500)
    pending = lb.session.motion.pending
    assert len(pending) == 1 and lb.agent.pinner.held_pages == 512  # the window stays full
    lb.run(10_600, step_ms=50)  # > 2 × the host timeout
    assert lb.session.counters.expired_requests == 1 and not lb.session.registered
    lb.drop_replies = False
    lb.run(3_000)
    assert lb.session.registered and lb.session.counters.expired_requests == 1
    assert lb.agent.pinner.held_pages == 4_000 and lb.host_ledger_pages() == 4_000


def test_not_registered_from_a_restarted_host_rehellos_and_adopts():
    lb = inflated(3_000)
    fresh = Loopback(lb.agent, report_interval_ms=1000)
    fresh.core = type(lb.core)(lb.core.config, "sess2", now_ms=lb.agent.now,
                               control_token="t0ken-for-unit-tests-0123456789")
    fresh.run(3_000)  # its first status gets NOT_REGISTERED; the re-hello is welcomed by a new session
    assert fresh.session.registered and fresh.session.reg.host_session == "sess2"
    assert fresh.host_ledger_pages() == 3_000 and fresh.agent.pinner.held_pages == 3_000


def test_bye_on_shutdown_releases_everything():
    lb = inflated(2_000)
    assert lb.session.shutdown() == 2_000
    lb.pump()
    assert isinstance(lb.to_host[-1], Bye) and lb.agent.pinner.held_pages == 0
    document = lb.core.snapshot(lb.agent.now)
    assert "a" not in [v["vm_id"] for v in document["vms"]] and "a" in [d["vm_id"] for d in document["departed"]]


def test_the_host_answers_the_bye_so_the_agent_knows_it_was_read():
    lb = inflated(100)
    lb.session.shutdown()
    bye_seq = lb.session.bye_seq
    captured: list[bytes] = []
    lb.deliver = lambda out: captured.extend(frame for _identity, frame in out)  # type: ignore[method-assign]
    lb.pump()
    assert bye_seq is not None and [decode(frame).message.kind for frame in captured] == ["bye"]
    assert lb.session.bye_answered(captured[0])
    assert not lb.session.bye_answered(encode(Bye(reason="dropped"), bye_seq + 1))  # another seq: not ours
    assert not lb.session.bye_answered(b"\xc1")  # not a frame


def test_an_agent_that_never_registered_waits_for_no_answer():
    lb = Loopback()
    lb.host_down = True
    lb.session.start(lb.agent.now)
    lb.pump()
    lb.session.shutdown()
    assert lb.session.bye_seq is None


def test_a_host_sample_period_change_reaches_the_live_session_and_changes_its_sampling():
    """balloonctl host sample_period=... → hostd's control plane → a `settings` frame → the
    running AgentSession samples at the new period, and the host averages the extra periods."""
    lb = registered()
    lb.agent.touched_ratio = 0.1
    assert lb.session.sampling.ws_period_ms == 10_000  # the welcome's
    lb.run(3_000)
    assert lb.agent.period_ends == [] and lb.core.vms["a"].working_set.samples == 0
    lb.set_host_params(sample_period_ms=1_000)
    pushed = [m for m in lb.to_agent if isinstance(m, Settings)]
    assert [m.sample_period_ms for m in pushed] == [1_000]
    assert lb.session.sampling.ws_period_ms == 1_000 and lb.session.registered
    changed_at = lb.agent.now
    lb.run(5_050)
    ends = lb.agent.period_ends
    assert len(ends) == 5 and ends[0] <= changed_at + 1_000
    assert all(b - a == 1_000 for a, b in itertools.pairwise(ends))  # the new period governs
    lb.run(1_000)  # the last period's status reaches the host
    working_set = lb.core.vms["a"].working_set
    assert working_set.samples >= 5 and lb.vm()["active_ratio"] < 0.5  # the host saw them: 1.0 → towards 0.1
    lb.set_host_params(sample_period_ms=500)  # below the agent's floor (1 s): raised to it
    assert lb.session.sampling.ws_period_ms == 1_000 and lb.session.counters.floored_welcomes == 1
    lb.set_host_params(balance_period_ms=20_000)  # not a setting agents act on: nothing pushed
    assert len([m for m in lb.to_agent if isinstance(m, Settings)]) == 2
