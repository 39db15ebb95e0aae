"""One contract, two hosts: the same agent-plane conversations run over MiniHost (the fake host
the agent integration tests talk to, tests/integration/minihost.py) and hostd.core.HostCore
(the real one), through one adapter, frames encoded and decoded by the protocol codec both ways.
Every assertion is on something guestagent depends on (guestagent/session.py, motion.py):
the welcome's fields and secret, which hellos are welcomed and which get CONFLICT, the
NOT_REGISTERED that makes an agent say hello again, per-range lock/unlock verdicts, the target
and its seq in SetTarget and in every lock/unlock reply, replies carrying the request's seq,
silence after a status or a bye. No sockets (but one smoke test of MiniHost's socket loop).

Where MiniHost differs from hostd on purpose, the difference is recorded in DEVIATIONS and
pinned by `test_recorded_deviation` (so a change on either side shows up here):
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import zmq

from hostd.config import HostConfig
from hostd.core import HostCore
from protocol import (
    Bye,
    ControlOk,
    Error,
    ErrorCode,
    Hello,
    Lock,
    LockResult,
    Message,
    PageRanges,
    RangeStatus,
    SetHostParams,
    SetManualTarget,
    SetTarget,
    Settings,
    Status,
    Unlock,
    UnlockResult,
    Welcome,
    decode,
    encode,
)
from tests.integration.minihost import MiniHost

MiB = 1 << 20
PAGE = 4096
MEMSZ = 256 * MiB
MEMSZ_PAGES = MEMSZ // PAGE
REPORT_MS = 1000
BATCH = 512
STATS_KEYS = ("swap_used_bytes", "major_faults")  # informational; what hostd acts on is typed
TOKEN = "t0ken-for-contract-tests-0123456789"

# What MiniHost does not do like hostd, and why that is fine for the agent tests that use it.
DEVIATIONS = {
    "welcome_settings": "MiniHost's welcome carries the sample period a test gives it (default None: the agent "
                        "keeps its own, chosen on its command line); hostd always sends its sample_period_ms. "
                        "reclaim is False on both unless a test asks for it (hostd: only with vswap and "
                        "reclaim_mode), checked below.",
    "policy": "MiniHost has no policy: targets come only from the test (hostd's policy sends a first target at "
              "its next recompute after a join, 0 on an undercommitted host). The target an agent is driven "
              "to agrees (checked: `effective_target`).",
    "target_after_rehello": "After a re-hello MiniHost sends the vm's last target at once with its old seq; "
                            "hostd at its next recompute (≤ 100 ms) with a new seq. Either is taken by the agent "
                            "(not stale: seq ≥ its own); checked in test_rehello_is_sent_the_current_target.",
    "settle_window": "MiniHost has no settle window after a restart: adopted balloons stay as targets until a "
                     "test sets one, which is what hostd does until its window ends.",
    "limits": "MiniHost has no join rate, max_vms, admission (reservations) or ledger range limit "
              "(LIMIT_EXCEEDED / ADMISSION_REFUSED / REFUSED unlocks at MAX_RANGES_PER_VM): no agent test "
              "reaches them; hostd's own unit tests cover them.",
    "secret_after_bye": "After a bye hostd keeps a vm that had reported (its secret proves a later hello); "
                        "MiniHost forgets it (a new secret). An agent sends bye only when it exits.",
}
__doc__ += "\n".join(f"- {key}: {text}" for key, text in DEVIATIONS.items())


def hello(vm_id: str = "a", held: int = 0, session: str | None = None, secret: str | None = None,
          memsz: int = MEMSZ, stats_keys: tuple[str, ...] = STATS_KEYS) -> Hello:
    return Hello(vm_id=vm_id, memsz_bytes=memsz, agent_version="contract", page_kind="vpn", supports_2m=False,
                 cgroup_version=2, max_batch_pages=BATCH, held_pages=held, last_host_session_id=session,
                 stats_keys=stats_keys, vm_secret=secret)


def status(balloon_pages: int = 0, stats: tuple = (0, None)) -> Status:
    return Status(balloon_pages=balloon_pages, acked_target_seq=0, refused_pages=0, agent_state="idle",
                  usage_bytes=100 * MiB, ws_touched_ratio=None, ws_samples=0, ws_current_ratio=None,
                  ws_method="referenced", stats=stats)


def lock(start: int, count: int, adopt: bool = False) -> Lock:
    return Lock(pages=PageRanges(((start, count),)), adopt=adopt)


def unlock(start: int, count: int) -> Unlock:
    return Unlock(pages=PageRanges(((start, count),)))


Out = list[tuple[bytes, bytes]]


# ---- the adapter: one interface, two hosts --------------------------------------------------
class Host:
    """A host under contract. `_handle` takes one agent frame; `_target` makes the host send a
    balloon target; both return the (routing id, frame) pairs the host sends."""

    name: str
    session_id: str

    def __init__(self) -> None:
        self.mail: dict[bytes, list[tuple[int, Message]]] = defaultdict(list)

    def _handle(self, route: bytes, frame: bytes) -> Out:
        raise NotImplementedError

    def _target(self, vm_id: str, pages: int) -> Out:
        raise NotImplementedError

    def _sample_period(self, period_ms: int) -> Out:
        raise NotImplementedError

    def ledger_pages(self, vm_id: str) -> int:
        raise NotImplementedError

    def _deliver(self, out: Out) -> None:
        for route, frame in out:
            envelope = decode(frame)
            self.mail[route].append((envelope.seq, envelope.message))

    def frame(self, route: bytes, frame: bytes) -> None:
        self._deliver(self._handle(route, frame))

    def set_target(self, vm_id: str, pages: int) -> None:
        self._deliver(self._target(vm_id, pages))

    def set_sample_period(self, period_ms: int) -> None:
        """The operator changes the host's sample period (hostd: balloonctl host sample_period=...)."""
        self._deliver(self._sample_period(period_ms))

    def connect(self, name: str) -> Peer:
        return Peer(self, b"\x00" + name.encode())


class MiniHostAdapter(Host):
    name = "minihost"

    def __init__(self, context: zmq.Context, sample_period_ms: int | None = None) -> None:
        super().__init__()
        self.mini = MiniHost(context, session_id="sess", report_interval_ms=REPORT_MS, batch_limit_pages=BATCH,
                             sample_period_ms=sample_period_ms)
        self.session_id = "sess"

    def _handle(self, route: bytes, frame: bytes) -> Out:
        return self.mini.handle_agent(route, frame)

    def _target(self, vm_id: str, pages: int) -> Out:
        return self.mini.target_frames(vm_id, pages)

    def _sample_period(self, period_ms: int) -> Out:
        return self.mini.settings_frames(period_ms)

    def ledger_pages(self, vm_id: str) -> int:
        return len(self.mini.ledger.get(vm_id.encode(), ()))


class HostCoreAdapter(Host):
    """hostd's core as its server drives it: every frame handled, then a tick (the server ticks
    every 100 ms; the clock stands still here, so nobody is lost and no balance period ends)."""

    name = "hostcore"

    def __init__(self) -> None:
        super().__init__()
        config = HostConfig(host_memory_bytes=4096 * MiB, report_interval_ms=REPORT_MS, batch_limit_pages=BATCH)
        self.core = HostCore(config, "sess", now_ms=0, control_token=TOKEN)
        self.session_id = "sess"
        self.now = 0

    def _handle(self, route: bytes, frame: bytes) -> Out:
        return self.core.handle_agent(route, frame, self.now) + self.core.tick(self.now)

    def _target(self, vm_id: str, pages: int) -> Out:
        reply, out = self.core.handle_control(encode(SetManualTarget(vm_id=vm_id, balloon_target_pages=pages), 1),
                                              self.now, operator=True)
        assert isinstance(decode(reply).message, ControlOk), decode(reply).message
        return out + self.core.tick(self.now)

    def _sample_period(self, period_ms: int) -> Out:
        reply, out = self.core.handle_control(encode(SetHostParams(params={"sample_period_ms": period_ms}), 1),
                                              self.now, operator=True)
        assert isinstance(decode(reply).message, ControlOk), decode(reply).message
        return out + self.core.tick(self.now)

    def ledger_pages(self, vm_id: str) -> int:
        return self.core.ledger.held_pages(vm_id)


@dataclass
class Peer:
    """One agent connection (one routing id), with the agent's view of its target."""

    host: Host
    route: bytes
    seq: int = 0
    seen: list[tuple[int, Message]] = field(default_factory=list)

    def send(self, message: Message) -> list[Message]:
        """Send one frame; the host's frames to this connection since the last send."""
        self.seq += 1
        self.host.frame(self.route, encode(message, self.seq))
        return self.take()

    def raw(self, frame: bytes) -> list[Message]:
        self.host.frame(self.route, frame)
        return self.take()

    def take(self) -> list[Message]:
        got = self.host.mail.pop(self.route, [])
        self.seen += got
        return [message for _, message in got]

    def reply(self, message: Message) -> Message:
        """The one answer to `message` (SetTargets aside), with the request's seq."""
        self.seq += 1
        self.host.frame(self.route, encode(message, self.seq))
        got = self.host.mail.pop(self.route, [])
        self.seen += got
        answers = [(seq, m) for seq, m in got if not isinstance(m, SetTarget)]
        assert len(answers) == 1, answers
        seq, answer = answers[0]
        assert seq == self.seq, f"reply seq {seq}, request seq {self.seq}"
        if isinstance(answer, Error):
            assert answer.in_reply_to == self.seq
        return answer

    def welcome(self, message: Hello) -> Welcome:
        answer = self.reply(message)
        assert isinstance(answer, Welcome), answer
        return answer

    def error(self, message: Message) -> ErrorCode:
        answer = self.reply(message)
        assert isinstance(answer, Error), answer
        return ErrorCode(answer.code)

    def targets(self) -> list[SetTarget]:
        return [m for _, m in self.seen if isinstance(m, SetTarget)]

    def effective_target(self, held: int = 0) -> tuple[int, int]:
        """(pages, seq) the agent would steer to: the latest target by seq (from SetTarget and
        lock/unlock replies; seq 0 = none set yet), else what it holds."""
        pages, seq = held, 0
        for _, m in self.seen:
            if isinstance(m, SetTarget | LockResult | UnlockResult) and m.target_seq >= seq and m.target_seq:
                pages, seq = m.target_pages, m.target_seq
        return pages, seq


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture(params=["minihost", "hostcore"])
def host(request, context) -> Iterator[Host]:
    adapter = MiniHostAdapter(context) if request.param == "minihost" else HostCoreAdapter()
    yield adapter
    if isinstance(adapter, MiniHostAdapter):
        adapter.mini.close()


def registered(host: Host, vm_id: str = "a", conn: str | None = None, **fields) -> tuple[Peer, Welcome]:
    peer = host.connect(conn or f"conn-{vm_id}")
    return peer, peer.welcome(hello(vm_id, **fields))


# ---- hello / welcome ------------------------------------------------------------------------
def test_welcome_fields_the_agent_reads(host):
    peer, welcome = registered(host)
    assert welcome.host_session_id == host.session_id
    assert welcome.report_interval_ms == REPORT_MS
    assert welcome.host_timeout_ms == (3 + 2) * REPORT_MS  # hostd: (lost_after_reports + 2) × report
    assert welcome.batch_limit_pages == BATCH
    assert isinstance(welcome.vm_secret, str) and len(welcome.vm_secret) >= 16
    assert welcome.reclaim is False
    assert welcome.sample_period_ms is None or welcome.sample_period_ms >= 10
    assert peer.effective_target()[0] == 0  # nothing to inflate yet (hostd: its policy says 0)


def test_each_registration_has_its_own_secret(host):
    _, first = registered(host, "a")
    _, second = registered(host, "b")
    assert first.vm_secret != second.vm_secret


def test_rehello_on_the_same_connection_with_the_secret_keeps_secret_and_ledger(host):
    peer, welcome = registered(host)
    assert [r.status for r in peer.reply(lock(0, 100)).results] == [RangeStatus.OK]
    again = peer.welcome(hello(held=100, session=host.session_id, secret=welcome.vm_secret))
    assert again.vm_secret == welcome.vm_secret
    assert host.ledger_pages("a") == 100
    assert [r.status for r in peer.reply(lock(0, 100, adopt=True)).results] == [RangeStatus.OK]
    assert host.ledger_pages("a") == 100


def test_rehello_from_a_new_connection_with_the_secret_moves_the_vm(host):
    old, welcome = registered(host, conn="old")
    old.reply(lock(0, 64))
    new = host.connect("new")
    again = new.welcome(hello(held=64, session=host.session_id, secret=welcome.vm_secret))
    assert again.vm_secret == welcome.vm_secret and host.ledger_pages("a") == 64
    assert old.error(status(64)) == ErrorCode.NOT_REGISTERED  # the old connection speaks for nobody now
    assert new.send(status(64)) == []


@pytest.mark.parametrize("claim", ["no secret", "wrong secret", "stale session"])
def test_a_second_claim_on_a_live_vm_gets_conflict_and_the_live_agent_keeps_it(host, claim):
    owner, welcome = registered(host, conn="owner")
    owner.reply(lock(0, 32))
    secret = {"no secret": None, "wrong secret": "x" * 32, "stale session": welcome.vm_secret}[claim]
    session = "other-session" if claim == "stale session" else host.session_id
    claim_hello = hello(secret=secret, session=session, stats_keys=("usage_bytes",))
    assert host.connect("intruder").error(claim_hello) == ErrorCode.CONFLICT
    assert owner.send(status(32)) == []  # still registered (statuses checked against its own hello)
    assert host.ledger_pages("a") == 32


def test_one_connection_speaks_for_one_vm(host):
    peer, _ = registered(host, "a", conn="shared")
    assert peer.error(hello("b")) == ErrorCode.CONFLICT
    assert peer.send(status()) == []  # still vm a


def test_a_new_session_hello_adopts_what_the_agent_holds(host):
    peer, _ = registered(host, held=1000, session="previous-host")
    for start, count in ((0, 500), (500, 500)):
        assert [r.status for r in peer.reply(lock(start, count, adopt=True)).results] == [RangeStatus.OK]
    assert host.ledger_pages("a") == 1000
    peer.send(status(1000))
    assert peer.effective_target(held=1000)[0] == 1000  # kept until a target says otherwise


def test_adoption_is_capped_by_memsz_not_by_the_balloon_cap(host):
    peer, _ = registered(host, held=MEMSZ_PAGES, session="previous-host")
    batches = [peer.reply(lock(start, BATCH, adopt=True)) for start in range(0, MEMSZ_PAGES, BATCH)]
    assert all(r.status == RangeStatus.OK for b in batches for r in b.results)
    assert [r.status for r in peer.reply(lock(MEMSZ_PAGES, 1, adopt=True)).results] == [RangeStatus.REFUSED]


# ---- frames from nobody ----------------------------------------------------------------------
@pytest.mark.parametrize("message", [status(), lock(0, 1), unlock(0, 1), Bye(reason="done")],
                         ids=["status", "lock", "unlock", "bye"])
def test_an_unregistered_connection_is_told_to_say_hello(host, message):
    assert host.connect("stranger").error(message) == ErrorCode.NOT_REGISTERED


def test_a_connection_that_names_a_registered_vm_is_not_its_connection(host):
    registered(host, "a", conn="conn-a")
    assert host.connect("a").error(status()) == ErrorCode.NOT_REGISTERED


BAD_FRAMES = {
    "empty": b"",
    "not-an-envelope": b"\x93\x01",
    "not-msgpack": b"\xc1",
    "set_target-from-an-agent": encode(SetTarget(target_pages=1, target_seq=1), 1),
    "welcome-from-an-agent": encode(Welcome(host_session_id="x", report_interval_ms=1000, host_timeout_ms=5000,
                                            batch_limit_pages=512, sample_period_ms=None, reclaim=False,
                                            vm_secret="s" * 16), 1),
    "settings-from-an-agent": encode(Settings(sample_period_ms=1000), 1),
}


@pytest.mark.parametrize("name", BAD_FRAMES)
def test_frames_no_agent_sends_are_answered_with_an_error(host, name):
    peer, _ = registered(host)
    [answer] = peer.raw(BAD_FRAMES[name])
    assert isinstance(answer, Error)
    expected = ErrorCode.UNEXPECTED_KIND if name.endswith("from-an-agent") else ErrorCode.MALFORMED
    assert answer.code == expected
    assert peer.send(status()) == []  # and the registration stands


# ---- status, lock, unlock --------------------------------------------------------------------
def test_status_is_unanswered(host):
    peer, _ = registered(host)
    assert peer.send(status()) == [] and peer.send(status()) == []


def test_a_status_with_the_wrong_number_of_stats_is_invalid(host):
    peer, _ = registered(host)
    assert peer.error(status(stats=(1, 2, 3))) == ErrorCode.INVALID_FIELD


def test_lock_verdicts_per_range(host):
    peer, _ = registered(host)
    host.set_target("a", 1000)
    reply = peer.reply(Lock(pages=PageRanges(((0, 100), (200, 50))), adopt=False))
    assert isinstance(reply, LockResult)
    assert [(r.start, r.count, r.status) for r in reply.results] == [(0, 100, RangeStatus.OK),
                                                                      (200, 50, RangeStatus.OK)]
    dup = peer.reply(Lock(pages=PageRanges(((50, 10), (300, 10))), adopt=False))
    assert [r.status for r in dup.results] == [RangeStatus.DUPLICATE, RangeStatus.OK]
    assert [r.status for r in peer.reply(lock(0, 100, adopt=True)).results] == [RangeStatus.OK]  # ours already
    assert host.ledger_pages("a") == 160


def test_locks_past_the_balloon_cap_are_refused(host):
    """The cap is max(ctl_max_percent of memsz, the target): 65 % of 65,536 pages = 42,598."""
    peer, _ = registered(host)
    cap = MEMSZ_PAGES * 65 // 100
    results = [peer.reply(lock(start, min(BATCH, cap - start))) for start in range(0, cap, BATCH)]
    assert all(r.status == RangeStatus.OK for b in results for r in b.results)
    assert [r.status for r in peer.reply(lock(cap, 1)).results] == [RangeStatus.REFUSED]
    assert host.ledger_pages("a") == cap
    host.set_target("a", cap + 10)  # a target above it raises it
    assert [r.status for r in peer.reply(lock(cap, 10)).results] == [RangeStatus.OK]
    assert [r.status for r in peer.reply(lock(cap + 10, 1)).results] == [RangeStatus.REFUSED]


def test_a_lock_past_the_batch_limit_is_refused_whole(host):
    peer, _ = registered(host)
    assert peer.error(lock(0, BATCH + 1)) == ErrorCode.LIMIT_EXCEEDED
    assert peer.error(unlock(0, BATCH + 1)) == ErrorCode.LIMIT_EXCEEDED
    assert host.ledger_pages("a") == 0


def test_unlock_verdicts(host):
    peer, _ = registered(host)
    peer.reply(lock(0, 100))
    reply = peer.reply(Unlock(pages=PageRanges(((0, 40), (90, 20)))))
    assert isinstance(reply, UnlockResult)
    assert [r.status for r in reply.results] == [RangeStatus.OK, RangeStatus.UNKNOWN]  # 100..109 never held
    assert host.ledger_pages("a") == 50  # what it did hold went
    assert [r.status for r in peer.reply(unlock(1000, 5)).results] == [RangeStatus.UNKNOWN]


# ---- targets ---------------------------------------------------------------------------------
def test_set_target_then_every_reply_carries_the_latest_target_and_seq(host):
    a, _ = registered(host, "a")
    b, _ = registered(host, "b")
    host.set_target("a", 300)
    a.take()
    [target_a] = [t for t in a.targets() if t.target_pages == 300]
    host.set_target("b", 200)
    b.take()
    [target_b] = [t for t in b.targets() if t.target_pages == 200]
    assert target_b.target_seq > target_a.target_seq > 0
    reply = a.reply(lock(0, 10))
    assert (reply.target_pages, reply.target_seq) == (300, target_a.target_seq)  # a's own seq, not b's
    reply = b.reply(unlock(0, 1))
    assert (reply.target_pages, reply.target_seq) == (200, target_b.target_seq)
    host.set_target("a", 100)
    a.take()
    assert a.effective_target() == (100, a.targets()[-1].target_seq)
    assert a.targets()[-1].target_seq > target_b.target_seq  # one counter, rising
    seqs = [t.target_seq for t in a.targets()]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_rehello_is_sent_the_current_target(host):
    peer, welcome = registered(host)
    host.set_target("a", 400)
    peer.take()
    _, seq = peer.effective_target()
    peer.welcome(hello(held=0, session=host.session_id, secret=welcome.vm_secret))
    pages, new_seq = peer.effective_target()
    assert pages == 400 and new_seq >= seq  # not stale for the agent (deviation: same seq or a new one)
    after = peer.targets()[-1]
    assert after.target_pages == 400


def test_a_target_for_a_vm_reaches_only_its_connection(host):
    a, _ = registered(host, "a")
    b, _ = registered(host, "b")
    a.take(), b.take()
    host.set_target("a", 123)
    assert b.take() == []
    assert [t.target_pages for t in a.take() if isinstance(t, SetTarget)] == [123]
    assert a.effective_target()[0] == 123


# ---- settings pushed to live agents (protocol v4) -------------------------------------------------
def test_a_changed_sample_period_reaches_every_registered_agent_and_later_welcomes(host):
    a, _ = registered(host, "a")
    b, _ = registered(host, "b")
    gone, _ = registered(host, "gone")
    assert [m.kind for m in gone.send(Bye(reason="done"))] == ["bye"]
    stranger = host.connect("stranger")
    for peer in (a, b, gone, stranger):
        peer.take()
    host.set_sample_period(5_000)
    for peer in (a, b):
        assert [m.sample_period_ms for m in peer.take() if isinstance(m, Settings)] == [5_000]
    assert gone.take() == [] and stranger.take() == []
    _, welcome = registered(host, "c")
    assert welcome.sample_period_ms == 5_000  # a newcomer gets the same value in its welcome
    assert a.send(status()) == []  # and nothing else changed for the live ones


# ---- bye ---------------------------------------------------------------------------------------
def test_bye_is_unanswered_then_the_connection_is_nobody_and_the_ledger_gone(host):
    peer, _ = registered(host)
    peer.reply(lock(0, 50))
    peer.send(status(50))
    assert [m.kind for m in peer.send(Bye(reason="shutting down"))] == ["bye"]  # read: the agent may close
    assert peer.error(status(50)) == ErrorCode.NOT_REGISTERED
    assert host.ledger_pages("a") == 0
    again = peer.welcome(hello(held=0))  # a plain hello registers it again
    assert again.host_session_id == host.session_id and host.ledger_pages("a") == 0


# ---- recorded deviations, pinned ---------------------------------------------------------------
def test_recorded_deviation_welcome_settings(context):
    mini, core = MiniHostAdapter(context), HostCoreAdapter()
    _, from_mini = registered(mini)
    _, from_core = registered(core)
    assert from_mini.sample_period_ms is None and from_core.sample_period_ms == HostConfig().sample_period_ms
    assert from_mini.reclaim is from_core.reclaim is False
    given = MiniHostAdapter(context, sample_period_ms=from_core.sample_period_ms)
    assert registered(given)[1].sample_period_ms == from_core.sample_period_ms
    mini.mini.close()
    given.mini.close()


def test_recorded_deviation_policy_sends_a_first_target(context):
    mini, core = MiniHostAdapter(context), HostCoreAdapter()
    peers = [registered(h)[0] for h in (mini, core)]
    assert peers[0].targets() == [] and [t.target_pages for t in peers[1].targets()] == [0]
    assert peers[0].effective_target()[0] == peers[1].effective_target()[0] == 0
    mini.mini.close()


def test_recorded_deviation_secret_after_bye(context):
    mini, core = MiniHostAdapter(context), HostCoreAdapter()
    secrets_kept = []
    for h in (mini, core):
        peer, welcome = registered(h)
        peer.send(status())
        peer.send(Bye(reason="x"))
        secrets_kept.append(peer.welcome(hello(session=h.session_id, secret=welcome.vm_secret)).vm_secret
                            == welcome.vm_secret)
    assert secrets_kept == [False, True]
    mini.mini.close()


def test_minihost_pump_answers_over_its_socket(context):
    """The socket loop around handle_agent: a DEALER says hello and gets the welcome."""
    mini = MiniHost(context)
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(mini.endpoint)
        dealer.send(encode(hello(), 7))
        mini.pump(lambda: bool(mini.welcomes), 10, "hello")
        assert dealer.poll(5000)
        envelope = decode(dealer.recv())
        assert isinstance(envelope.message, Welcome) and envelope.seq == 7
    finally:
        dealer.close(linger=0)
        mini.close()


@pytest.mark.parametrize("claim", ["no secret", "wrong secret"])
def test_a_hello_without_the_secret_on_the_vms_own_connection_gets_conflict(host, claim):
    """Even its own connection must prove it: a live registration is never restarted by a bare hello."""
    peer, _ = registered(host)
    peer.reply(lock(0, 16))
    secret = None if claim == "no secret" else "y" * 32
    assert peer.error(hello(secret=secret, session=host.session_id)) == ErrorCode.CONFLICT
    assert host.ledger_pages("a") == 16 and peer.send(status(16)) == []
