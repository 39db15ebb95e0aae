"""The agent loop: one DEALER socket, a blocking zmq.Poller, and the pinner. Every decision
is made by `guestagent.agent`; this module only moves bytes, pages and time.

Identity (protocol v3): the agent sets no routing id; hostd's ROUTER assigns one per
connection and binds the vm to the connection whose hello it welcomed. The welcome carries a
`vm_secret`; every later hello (a reconnect on a fresh socket, NOT_REGISTERED, an expired
request) presents it with `last_host_session_id`, which is how hostd tells this agent coming
back from anyone else claiming the vm (they get CONFLICT). The secret is never logged.
With CurveZMQ the host's public key is pinned: no key file, no start.

Lifecycle: hello → welcome (adopt any balloon still held: lock(adopt=True)) → follow
set_target in batches, answering nothing without the host's per-range verdict → status
every report interval (unanswered). The host counts as there while frames come from it or
our sends get through: with ZMQ_IMMEDIATE a send fails while no connection is up, and ZMTP
heartbeats (PING/PONG, answered by hostd's I/O thread) drop a connection to a host that
stopped answering. Host unreachable for host_timeout_ms → re-hello with backoff on a fresh
socket; for host_grace_ms more → deflate gradually. A lock/unlock unanswered for
2 × host_timeout_ms (a reply dropped on the way: hostd drops replies it cannot send at once)
→ re-hello on a fresh socket and re-adopt what is held, instead of waiting for it forever.
SIGTERM/SIGINT → deflate, bye, exit 0.

Speed (issue 18): inflation pins 8 batches per mlock and keeps up to 32 locks in flight;
deflation outside reclaim mode frees first and reports after; libzmq's I/O thread is
SCHED_BATCH while the balloon moves. Pressure: besides the periodic check, a cgroup v1 usage
threshold (guestagent/alarm.py) wakes the loop when the guest nears its limit, and a fast
growth of the guest's own demand is answered by giving its need back at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from dataclasses import dataclass

import psutil
import zmq

from guestagent import agent
from guestagent.alarm import UsageAlarm
from guestagent.balloon import Batch, Pinner
from guestagent.cgroup import READING_STATS_KEYS, CgroupReader, GuestReading
from guestagent.config import AgentConfig
from guestagent.errors import AgentError, CgroupError, PinError
from guestagent.wss import Sample, WorkingSetSampler
from protocol import (
    PAGE_SIZE_BYTES,
    Bye,
    Error,
    ErrorCode,
    Heartbeat,
    Hello,
    Lock,
    LockResult,
    Message,
    PageRanges,
    ProtocolError,
    RangeResult,
    RangeStatus,
    SetTarget,
    Status,
    Unlock,
    UnlockResult,
    Welcome,
    decode,
    encode,
    stats_values,
)
from protocol.limits import MAX_FRAME_BYTES, MAX_RANGES_PER_MESSAGE

log = logging.getLogger(__name__)

AGENT_VERSION = "0.1.0"


# The names of every status's stats array, declared once at hello.
STATS_KEYS: tuple[str, ...] = (*READING_STATS_KEYS, "givable_bytes", "balloon_returned_bytes", "pressure_deflates",
                               "ws_samples", "ws_current_ratio", "expired_requests", "absurd_target_seqs",
                               *agent.WORKLOAD_REPORT_FIELDS.values())


def _now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def _zmq_io_threads() -> list[int]:
    """Thread ids of libzmq's I/O threads in this process (named ZMQbg/IO/n)."""
    tids = []
    with contextlib.suppress(OSError):
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/comm") as comm:
                if comm.read().startswith("ZMQbg/IO"):
                    tids.append(int(tid))
    return tids


@dataclass
class _Pending:
    """A lock/unlock sent and not yet answered. `batch` is the pinned batch it concerns
    (None when the pages were already freed: pressure deflate frees first, reports after)."""

    kind: str  # "lock" | "unlock"
    batch: Batch | None
    adopt: bool = False
    sent_ms: int = 0
    pages: PageRanges | None = None  # an unlock's pages (re-sent if its reply never comes)


@dataclass
class Counters:
    inflated_pages: int = 0
    deflated_pages: int = 0
    refused_pages: int = 0
    pressure_deflates: int = 0
    protocol_errors: int = 0
    expired_requests: int = 0  # lock/unlock replies that never came (each expiry: one re-hello)
    absurd_target_seqs: int = 0  # set_targets ignored for a seq far above the high-water mark
    floored_welcomes: int = 0  # welcomes whose periods were raised to the agent's floors


class AgentLoop:
    def __init__(self, cfg: AgentConfig, context: zmq.Context[zmq.Socket[bytes]] | None = None) -> None:
        self.cfg = cfg
        self.reader = CgroupReader.for_path(cfg.cgroup_path) if cfg.cgroup_path else CgroupReader.detect()
        first = self.reader.read()
        memsz = cfg.memsz_bytes or first.limit_bytes
        if memsz is None:
            raise AgentError(f"cgroup {self.reader.path} has no memory limit: give the guest size with --memsz")
        self.memsz_bytes = memsz - memsz % PAGE_SIZE_BYTES
        self.pinner = Pinner(self.memsz_bytes // PAGE_SIZE_BYTES, want_pfn=cfg.want_pfn, huge_pages=cfg.huge_pages)
        self.pacing = agent.PacingConfig(batch_pages=cfg.batch_pages)
        self.sampler = WorkingSetSampler(self.reader, self.memsz_bytes, exclude_pids={os.getpid()})
        self._curve = self._load_curve_keys(cfg)
        self.context = context or zmq.Context.instance()
        self._io_batch = False  # libzmq's I/O threads run SCHED_BATCH (while the balloon moves)
        self.alarm = UsageAlarm.for_cgroup(self.reader.path, self.reader.version)  # None: periodic checks only
        # The reading the guest's demand growth is measured from, with the balloon's pages and
        # the time at that reading: ≥ 20 ms back, so a wake-up right after a check still sees
        # a rate, not the noise of a few pages.
        self._growth_ref: tuple[GuestReading, int, int] | None = None
        self.socket: zmq.Socket[bytes] | None = None
        self.counters = Counters()
        self.stop_requested = False
        self._seq = 0
        self._pending: dict[int, _Pending] = {}
        self._registered = False
        self._host_session: str | None = None
        self._vm_secret: str | None = None  # from the latest welcome; presented on re-hello, never logged
        self._target_seq_ms = 0  # when the target seq high-water mark last moved
        self._absurd_seq_logged = False  # once per session
        self._unsettled_unlocks: list[PageRanges] = []  # unlocks whose reply never came: re-sent after welcome
        # Requests waiting for room in the window (max_rate_batches in flight): adopt locks after a
        # welcome and unlocks of freed pages. A burst of thousands (a 4 GiB balloon re-adopted)
        # would overrun the socket's high-water mark, and a send refused there is lost.
        self._outbox: deque[tuple[Lock | Unlock, Batch | None]] = deque()
        self._report_interval_ms = cfg.report_interval_ms
        self._host_timeout_ms = 5 * cfg.report_interval_ms
        self._batch_limit = cfg.batch_pages
        self._target_pages = 0
        self._target_seq = 0
        self._rate_batches = 1
        self._inflate_paused_until_ms = 0
        self._backoff = agent.PressureBackoff()
        self._last_refusal_transient: bool | None = None  # logs a refusal once per kind, not per second
        self._refused_since_target = 0
        self._last_reading: GuestReading | None = first
        self._givable = 0
        self._state = "idle"
        # When a send first failed with no connection up (None: the last send got through or a
        # frame came in). Time alone proves nothing: the agent itself may have stalled for
        # seconds pinning pages in a thrashing guest while the host was there all along.
        self._unreachable_since_ms: int | None = None
        self._host_lost_since_ms: int | None = None
        self._next_hello_ms = 0
        self._hello_backoff_ms = 100
        self._next_report_ms = 0
        self._next_check_ms = 0
        self._next_ws_ms = 0
        self._lost_deflate_due_ms = 0
        self._last_check_ms = 0
        self._pinned_since_check = False
        self._headroom = 0  # unpaced: everything the guest could give (pressure and refusal decisions)
        self._last_ws: Sample | None = None
        self._ws_current: Sample | None = None  # the running period so far, as of the last report
        self._ws_samples = 0  # completed sampling periods: the host averages each one once
        self._ws_period_ms = cfg.ws_period_ms
        self._movement: tuple[int, int] | None = None  # (started_ms, balloon pages then) toward a target
        self._reclaim = False  # the host takes the balloon's memory (welcome's settings: "reclaim")

    # ---- socket ----------------------------------------------------------------------
    @staticmethod
    def _load_curve_keys(cfg: AgentConfig) -> tuple[bytes, bytes, bytes] | None:
        """(client public, client secret, pinned server public), or None without CURVE. Read
        once at start: a missing or wrong key file stops the agent here, with its name."""
        if cfg.curve_client_key is None and cfg.curve_server_public_key is None:
            return None
        if cfg.curve_server_public_key is None or cfg.curve_client_key is None:
            raise AgentError("CurveZMQ needs both --curve-client-key and --curve-server-public-key: the agent "
                             "talks only to the host whose public key it was given (pinned)")
        from protocol.keys import KeyFileError, load_keypair

        try:
            client = load_keypair(cfg.curve_client_key)
            server = load_keypair(cfg.curve_server_public_key)
        except KeyFileError as exc:
            raise AgentError(f"CurveZMQ: {exc}; refusing to start without the keys it was configured with") from None
        if not client.secret_key:
            raise AgentError(f"CurveZMQ: {cfg.curve_client_key} has no secret key (give the agent's .key_secret file)")
        return client.public_key, client.secret_key, server.public_key

    def _open_socket(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)
        # No ZMQ_IDENTITY: hostd's ROUTER assigns the routing id, one per connection, and
        # binds the vm to the connection its hello came from.
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue hellos for a host that is not there
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        # A host that vanished without closing the connection (a cut network) is noticed by
        # its missing PONGs: the connection drops and sends start failing.
        sock.setsockopt(zmq.HEARTBEAT_IVL, self._host_timeout_ms)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, self._host_timeout_ms)
        if self._curve is not None:
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = self._curve
        sock.connect(self.cfg.host_endpoint)
        self.socket = sock

    def _send(self, message: Message) -> int:
        self._seq += 1
        assert self.socket is not None
        try:
            self.socket.send(encode(message, self._seq), zmq.NOBLOCK)
            self._unreachable_since_ms = None  # a connection to the host is up
        except zmq.Again:
            log.debug("host not reachable: %s not sent", message.kind)
            if self._unreachable_since_ms is None:
                self._unreachable_since_ms = _now_ms()
        return self._seq

    # ---- main loop -------------------------------------------------------------------
    def _poller(self) -> zmq.Poller:
        poller = zmq.Poller()
        assert self.socket is not None
        poller.register(self.socket, zmq.POLLIN)
        if self.alarm is not None and self.alarm.fd is not None:
            poller.register(self.alarm.fd, zmq.POLLIN)
        return poller

    def run(self) -> int:
        self._open_socket()
        self._check_guest(_now_ms())  # arms the usage alarm
        poller = self._poller()
        polled = (self.socket, self.alarm.fd if self.alarm else None)
        now = _now_ms()
        self.sampler.start_period(now)
        self._next_ws_ms = now + self._ws_period_ms
        log.info("agent %s: memsz %d MiB, cgroup v%d at %s, page numbers %s, host %s",
                 self.cfg.vm_id, self.memsz_bytes >> 20, self.reader.version, self.reader.path,
                 self.pinner.page_kind, self.cfg.host_endpoint)
        while not self.stop_requested:
            moving = self._registered and (bool(self._pending) or self._target_pages != self.pinner.held_pages)
            self._io_scheduling(moving)
            timeout = self._poll_timeout_ms()
            events = dict(poller.poll(timeout))
            if self.socket in events:
                self._drain()
            if self.alarm is not None and self.alarm.fd in events:
                # Usage crossed the alarm threshold: check the guest now, not at the next
                # interval (at most every 5 ms however often usage swings across it).
                self.alarm.drain()
                self._next_check_ms = min(self._next_check_ms, self._last_check_ms + 5)
            self._tick(_now_ms())
            if (self.socket, self.alarm.fd if self.alarm else None) != polled:
                # The socket was replaced (host lost) or the alarm re-armed (a new limit).
                poller = self._poller()
                polled = (self.socket, self.alarm.fd if self.alarm else None)
        self._shutdown()
        return 0

    def _io_scheduling(self, moving: bool) -> None:
        """libzmq's I/O thread as SCHED_BATCH while the balloon moves, SCHED_OTHER otherwise.

        Every lock sent wakes the I/O thread (an eventfd write); a woken SCHED_OTHER thread
        preempts the one that woke it, so on a busy 2-core guest each send handed the CPU away
        for ~0.3 ms: a quarter of a 1 GiB inflate (issue 18). A SCHED_BATCH thread never
        preempts on wakeup. At rest the thread is normal again, so that a new target's frame
        reaches the agent without waiting for a tick."""
        if moving == self._io_batch:
            return
        self._io_batch = moving
        policy = os.SCHED_BATCH if moving else os.SCHED_OTHER
        for tid in _zmq_io_threads():
            with contextlib.suppress(OSError):
                os.sched_setscheduler(tid, policy, os.sched_param(0))

    def _effective_balloon_pages(self) -> int:
        """Pinned pages minus those already on their way out (unlock sent)."""
        leaving = sum(p.batch.page_count for p in self._pending.values() if p.kind == "unlock" and p.batch)
        return self.pinner.held_pages - leaving

    def _window(self) -> int:
        """Batches allowed in flight. Inflating: the adaptive rate (vmw_balloon: halve on
        failure, grow on success, at most max_rate_batches). Deflating is never slowed."""
        if self._target_pages < self._effective_balloon_pages():
            return self.pacing.max_rate_batches
        return self._rate_batches

    def _busy(self) -> bool:
        return (self._registered and len(self._pending) < self._window()
                and (self._target_pages != self._effective_balloon_pages() or bool(self._outbox)))

    def _queue(self, message: Lock | Unlock, batch: Batch | None) -> None:
        self._outbox.append((message, batch))

    def _send_outbox(self) -> bool:
        """Send queued requests while at most max_rate_batches are in flight. An adopt lock of
        a batch freed meanwhile (pressure) is dropped: its pages are not the balloon's now."""
        sent = False
        while self._outbox and len(self._pending) < self.pacing.max_rate_batches:
            message, batch = self._outbox.popleft()
            if batch is not None and not self.pinner.holds(batch):
                continue
            self._request(message, batch, adopt=isinstance(message, Lock) and message.adopt)
            sent = True
        return sent

    def _poll_timeout_ms(self) -> int:
        if self._busy() and _now_ms() >= self._inflate_paused_until_ms:
            return 0
        deadlines = [self._next_report_ms, self._next_check_ms, self._next_ws_ms]
        if not self._registered:
            deadlines.append(self._next_hello_ms)
        return max(0, min(min(deadlines) - _now_ms(), 1000))

    def _drain(self) -> None:
        assert self.socket is not None
        while True:
            try:
                frame = self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._unreachable_since_ms = None
            try:
                envelope = decode(frame)
            except ProtocolError as exc:
                self.counters.protocol_errors += 1
                log.warning("bad frame from host: %s", exc)
                continue
            self._handle(envelope.seq, envelope.message)

    def _tick(self, now: int) -> None:
        if now >= self._next_check_ms:
            self._next_check_ms = now + self.cfg.check_interval_ms
            self._check_guest(now)
        if (self._registered and self._unreachable_since_ms is not None
                and now - self._unreachable_since_ms > self._host_timeout_ms):
            self._lose_host(now)
        if self._registered and self._pending:
            self._expire_pending(now)
        if not self._registered:
            if now >= self._next_hello_ms:
                self._say_hello(now)
            if self._host_lost_since_ms is not None and now - self._host_lost_since_ms > self.cfg.host_grace_ms:
                self._deflate_without_host(now)
        else:
            self._send_outbox()
            while not self._outbox and len(self._pending) < self._window() and self._step(now):
                pass
        if now >= self._next_ws_ms:
            self._next_ws_ms = now + self._ws_period_ms
            self._last_ws = self.sampler.current(now, self._last_reading) if self._last_reading else None
            self._ws_samples += self._last_ws is not None
            self.sampler.start_period(now)
        if now >= self._next_report_ms and self._registered:
            self._next_report_ms = now + self._report_interval_ms
            self._report(now)

    # ---- registration ----------------------------------------------------------------
    def _say_hello(self, now: int) -> None:
        self._send(Hello(
            vm_id=self.cfg.vm_id, memsz_bytes=self.memsz_bytes, agent_version=AGENT_VERSION,
            page_kind=self.pinner.page_kind,  # type: ignore[arg-type]
            supports_2m=self.pinner.huge_pages, cgroup_version=self.reader.version,
            max_batch_pages=self.cfg.batch_pages, held_pages=self.pinner.held_pages,
            last_host_session_id=self._host_session, stats_keys=STATS_KEYS,
            vm_secret=self._vm_secret,  # None until a welcome gave one
        ))
        self._next_hello_ms = now + self._hello_backoff_ms
        self._hello_backoff_ms = min(self._hello_backoff_ms * 2, 5_000)

    def _lose_host(self, now: int) -> None:
        log.warning("host unreachable for %d ms: re-registering (balloon %d pages held)",
                    now - (self._unreachable_since_ms or now), self.pinner.held_pages)
        self._host_lost_since_ms = now
        self._state = "host_lost"
        self._reregister(now)

    def _reregister(self, now: int) -> None:
        """Say hello again on a fresh connection. Batches pinned but unconfirmed stay pinned:
        after welcome they are re-reported with adopt=True like the rest of the balloon, and
        unlocks never confirmed are sent again (freed pages must leave the host's ledger,
        which a same-session welcome keeps)."""
        self._registered = False
        self._settle_pending()
        self._hello_backoff_ms = 100
        self._next_hello_ms = now
        self._unreachable_since_ms = None
        self._open_socket()

    def _settle_pending(self) -> None:
        self._unsettled_unlocks.extend(m.pages for m, _ in self._outbox if isinstance(m, Unlock))
        self._outbox.clear()  # adopt locks: everything held is re-adopted after the next welcome
        for pending in self._pending.values():
            # A batch still pinned is re-adopted instead; only freed pages need the unlock.
            if (pending.kind == "unlock" and pending.pages is not None
                    and (pending.batch is None or not self.pinner.holds(pending.batch))):
                self._unsettled_unlocks.append(pending.pages)
        self._pending.clear()

    def _expire_pending(self, now: int) -> None:
        """A reply that never comes would stall the balloon for good (the window stays full):
        after two host timeouts, re-register and re-adopt (review S19)."""
        oldest = min(p.sent_ms for p in self._pending.values())
        if now - oldest <= 2 * self._host_timeout_ms:
            return
        self.counters.expired_requests += len(self._pending)
        log.warning("%d lock/unlock requests unanswered for %d ms (the host dropped the replies?): "
                    "re-registering and re-adopting %d held pages", len(self._pending), now - oldest,
                    self.pinner.held_pages)
        self._reregister(now)

    def _request(self, message: Lock | Unlock, batch: Batch | None, adopt: bool = False) -> None:
        seq = self._send(message)
        pages = message.pages if isinstance(message, Unlock) else None
        self._pending[seq] = _Pending(message.kind, batch, adopt=adopt, sent_ms=_now_ms(), pages=pages)

    def _on_welcome(self, welcome: Welcome) -> None:
        new_session = welcome.host_session_id != self._host_session
        self._registered = True
        self._host_lost_since_ms = None
        self._host_session = welcome.host_session_id
        self._vm_secret = welcome.vm_secret
        timings = agent.welcome_timings(welcome.report_interval_ms, welcome.host_timeout_ms,
                                        welcome.settings.get("sample_period_ms"))
        if timings.floored:
            self.counters.floored_welcomes += 1
            log.warning("welcome asked for %s below the agent's floors: raised to report %d ms, host timeout %d ms, "
                        "sample period ≥ %d ms", ", ".join(timings.floored), timings.report_interval_ms,
                        timings.host_timeout_ms, agent.MIN_SAMPLE_PERIOD_MS)
        self._report_interval_ms = timings.report_interval_ms
        self._host_timeout_ms = timings.host_timeout_ms
        self._batch_limit = min(self.cfg.batch_pages, welcome.batch_limit_pages)
        self._reclaim = welcome.settings.get("reclaim") is True
        if timings.sample_period_ms is not None:
            self._ws_period_ms = timings.sample_period_ms  # the host's Mem.SamplePeriod governs
            self._next_ws_ms = min(self._next_ws_ms, _now_ms() + timings.sample_period_ms)
        self._hello_backoff_ms = 100
        self._next_report_ms = 0
        if new_session:
            self._target_pages, self._target_seq = self.pinner.held_pages, 0
            self._absurd_seq_logged = False
        log.info("registered with host session %s (%s); report every %d ms; adopting %d held pages",
                 welcome.host_session_id, "new" if new_session else "same", self._report_interval_ms,
                 self.pinner.held_pages)
        unsettled, self._unsettled_unlocks = self._unsettled_unlocks, []
        if unsettled and not new_session:  # a new host never had them in its ledger
            # First (the host handles our frames in order), and only what the balloon does
            # not hold again: the adopt locks below then re-report everything it holds.
            held = PageRanges.from_ranges(r for batch in self.pinner.batches for r in batch.pages.ranges)
            freed = agent.subtract_pages(PageRanges.from_ranges(r for pages in unsettled for r in pages.ranges), held)
            for chunk in freed.split(self._batch_limit, MAX_RANGES_PER_MESSAGE):
                self._queue(Unlock(pages=chunk), None)
        for batch in self.pinner.batches:
            for chunk in batch.pages.split(self._batch_limit, MAX_RANGES_PER_MESSAGE):
                self._queue(Lock(pages=chunk, adopt=True), batch)
        self._send_outbox()

    # ---- messages --------------------------------------------------------------------
    def _handle(self, seq: int, message: Message) -> None:
        if isinstance(message, Welcome):
            self._on_welcome(message)
        elif not self._registered:
            return  # stale traffic from before a reconnect
        elif isinstance(message, SetTarget):
            self._on_target(message.target_pages, message.target_seq)
        elif isinstance(message, LockResult):
            self._on_lock_result(seq, message)
        elif isinstance(message, UnlockResult):
            self._on_unlock_result(seq, message)
        elif isinstance(message, Error):
            self.counters.protocol_errors += 1
            log.warning("host error %s: %s (in reply to %s)", ErrorCode(message.code).name
                        if message.code in ErrorCode._value2member_map_ else message.code,
                        message.detail, message.in_reply_to)
            if message.code == ErrorCode.NOT_REGISTERED:  # a new host that does not know us yet
                self._registered = False
                self._settle_pending()
                self._next_hello_ms = 0
                self._hello_backoff_ms = 100
            elif message.code in (ErrorCode.CONFLICT, ErrorCode.ADMISSION_REFUSED):
                self._registered = False  # retry hello with backoff: the host may change its mind
            self._pending.pop(message.in_reply_to or -1, None)
        elif isinstance(message, Heartbeat):
            pass
        else:
            log.debug("ignoring %s from host", message.kind)

    def _on_target(self, target_pages: int, target_seq: int) -> None:
        # seq 0 = the host has not set a target for this session yet; older seqs are stale.
        now = _now_ms()
        verdict = agent.classify_target_seq(target_seq, self._target_seq, now - self._target_seq_ms)
        if verdict == "stale":
            return
        if verdict == "absurd":
            self.counters.absurd_target_seqs += 1
            if not self._absurd_seq_logged:
                self._absurd_seq_logged = True
                log.warning("ignoring a target with seq %d, %d above the last one (%d): not this host's "
                            "(logged once per session; counted)", target_seq, target_seq - self._target_seq,
                            self._target_seq)
            return
        if target_seq != self._target_seq:
            self._target_seq_ms = now
        target = min(target_pages, self.pinner.capacity_pages)
        if target != self._target_pages:
            log.info("target %d → %d pages (seq %d)", self._target_pages, target, target_seq)
            self._movement = (_now_ms(), self.pinner.held_pages)
            self._refused_since_target = 0
        self._target_pages, self._target_seq = target, target_seq

    def _results_ok(self, results: tuple[RangeResult, ...], kinds: tuple[RangeStatus, ...]) -> bool:
        return all(result.status in kinds for result in results)

    def _on_lock_result(self, seq: int, result: LockResult) -> None:
        self._on_target(result.target_pages, result.target_seq)
        pending = self._pending.pop(seq, None)  # the host replies with the request's seq
        if pending is None or pending.kind != "lock" or pending.batch is None:
            return
        if not self.pinner.holds(pending.batch):
            return  # freed under pressure meanwhile; the unlock sent then settles the ledger
        accepted = (RangeStatus.OK, RangeStatus.DUPLICATE) if pending.adopt else (RangeStatus.OK,)
        if self._results_ok(result.results, accepted):
            if self._reclaim:
                self.pinner.drop_backing(pending.batch)
            if not pending.adopt:
                self.counters.inflated_pages += pending.batch.page_count
                self._rate_batches = agent.next_rate(self._rate_batches, True, self.pacing)
            return
        # The host refused some of it: free the whole batch; tell the host about parts it took.
        refused = sum(r.count for r in result.results if r.status not in accepted)
        self.counters.refused_pages += refused
        self._refused_since_target += refused
        self._rate_batches = agent.next_rate(self._rate_batches, False, self.pacing)
        self._inflate_paused_until_ms = _now_ms() + self.pacing.refusal_pause_ms
        taken = PageRanges.from_ranges((r.start, r.count) for r in result.results if r.status in accepted)
        self.pinner.release(pending.batch)
        log.info("host refused %d pages of a lock (%s): released the batch",
                 refused, sorted({r.status.name for r in result.results}))
        if taken:
            self._queue(Unlock(pages=taken), None)
            self._send_outbox()

    def _on_unlock_result(self, seq: int, result: UnlockResult) -> None:
        self._on_target(result.target_pages, result.target_seq)
        pending = self._pending.pop(seq, None)
        if pending is None or pending.kind != "unlock" or pending.batch is None:
            return
        if self._results_ok(result.results, (RangeStatus.OK, RangeStatus.UNKNOWN)):
            if self.pinner.holds(pending.batch):
                self.pinner.release(pending.batch)
                self.counters.deflated_pages += pending.batch.page_count
        else:
            log.warning("host kept pages of an unlock %s: balloon keeps them", [r.status.name for r in result.results])

    # ---- inflate / deflate -----------------------------------------------------------
    def _host_swap_free_and_available(self) -> tuple[int, int]:
        """Host swap free and host memory available (containers see the host's meminfo)."""
        vm = psutil.virtual_memory()
        return psutil.swap_memory().free, vm.available

    def _check_guest(self, now: int) -> None:
        try:
            reading = self.reader.read()
        except CgroupError as exc:
            log.warning("cannot read guest statistics: %s", exc)
            return
        swap_free, available = self._host_swap_free_and_available()
        # The balloon's own pages are part of usage; givable counts what is left beyond them.
        self._givable = agent.givable_bytes(reading, swap_free, available, self.pacing)
        headroom = agent.givable_bytes(reading, swap_free, available, self.pacing, paced=False)
        self._headroom = headroom
        interval_s = (now - self._last_check_ms) / 1000 if self._last_check_ms else 0.0
        self._last_check_ms = now
        reason = agent.detect_pressure(self._last_reading, reading, headroom, self.pacing, interval_s,
                                       pinned_since_last=self._pinned_since_check,
                                       soft_signals=agent.soft_pressure_counts(self._backoff, now, self.pacing))
        growth = None
        ref = self._growth_ref
        if ref is None or now - ref[2] >= 20:
            if ref is not None:
                balloon_delta = (self.pinner.held_pages - ref[1]) * PAGE_SIZE_BYTES
                growth = agent.workload_growth(ref[0], reading, balloon_delta, (now - ref[2]) / 1000, self.pacing)
            # The balloon as it was at this reading (before any deflate below): the next
            # growth then counts what is freed now as the balloon's, not as the guest's.
            self._growth_ref = (reading, self.pinner.held_pages, now)
        if reason is None and growth is not None:
            reason, headroom = growth[0], min(headroom, -growth[1])
        self._pinned_since_check = False
        self._last_reading = reading
        if self.alarm is not None and reading.limit_bytes is not None:
            # Wake when the guest's usage comes within two margins of its limit: the balloon
            # leaves one margin free, and a workload writing ~1 GB/s fills one (30 MiB of a
            # 512 MiB guest) in ~30 ms, less than a busy 2-core guest may take to schedule
            # the agent and munlock; without swap the charge that finds no room is an OOM kill.
            self.alarm.arm(reading.limit_bytes - 2 * agent.margin_bytes(reading, self.pacing))
        if reason and self.pinner.held_pages:
            self._pressure_deflate(now, reason, headroom)

    def _pressure_deflate(self, now: int, reason: str, headroom: int) -> None:
        """Free first (the workload needs the memory now), report after."""
        want = agent.pressure_release_pages(self.pinner.held_pages, headroom, self.pacing)
        freed_ranges: list[tuple[int, int]] = []
        freed = 0
        for batch in self.pinner.batches_from_top():
            if freed >= want:
                break
            self.pinner.release(batch)
            freed += batch.page_count
            freed_ranges.extend(batch.pages.ranges)
        self.counters.deflated_pages += freed
        self.counters.pressure_deflates += 1
        self._backoff = agent.after_pressure(self._backoff, self.pinner.held_pages, now, self.pacing)
        self._last_refusal_transient = None
        self._inflate_paused_until_ms = max(self._inflate_paused_until_ms, self._backoff.paused_until_ms)
        self._state = "pressure_deflate"
        log.warning("deflate %d pages at once: %s; inflation paused %d ms, then held below %d pages "
                    "(pressure episode %d in a row)", freed, reason, self._backoff.paused_until_ms - now,
                    self._backoff.ceiling_pages, self._backoff.episodes_in_row)
        # In-flight locks of freed batches are answered later and then ignored: the host
        # handles our messages in order, so the unlocks below remove what they added (and
        # queued adopt locks of freed batches are never sent).
        if self._registered and freed_ranges:
            for chunk in PageRanges.from_ranges(freed_ranges).split(self._batch_limit, MAX_RANGES_PER_MESSAGE):
                self._queue(Unlock(pages=chunk), None)
            self._send_outbox()
        elif freed_ranges:  # told after the next welcome (a same-session host keeps its ledger)
            self._unsettled_unlocks.append(PageRanges.from_ranges(freed_ranges))

    def _working_set_cap(self) -> int | None:
        """From accessed bits only: the active-LRU fallback counts idle pages that reclaim has
        not aged yet, which would hold an idle guest's balloon back. The larger of the last
        period and the one running (updated each report), so a workload that wakes up counts
        within a second."""
        samples = [s.ratio for s in (self._last_ws, self._ws_current) if s is not None and s.method == "referenced"]
        limit = self._last_reading.limit_bytes if self._last_reading else None
        if self._reclaim and limit is not None:
            # The host lowered the limit by the memory the balloon handed back: the guest's
            # size for this cap is still its own limit (never more than it).
            limit = min(self.memsz_bytes, limit + self.pinner.dropped_pages * PAGE_SIZE_BYTES)
        return agent.working_set_cap_pages(limit, self.memsz_bytes, max(samples) if samples else None, self.pacing)

    def _step(self, now: int) -> bool:
        """One batch toward the target. Returns whether a request was sent."""
        plan = agent.plan(
            balloon_pages=self._effective_balloon_pages(), target_pages=self._target_pages,
            givable=self._givable, rate_batches=self._rate_batches, now_ms=now,
            inflate_paused_until_ms=self._inflate_paused_until_ms, cfg=self.pacing,
            ceiling_pages=agent.inflate_ceiling_pages(self._backoff, now, self.pacing),
            working_set_cap=self._working_set_cap(),
        )
        if plan.action == "hold":
            if self._movement is not None and not self._pending and plan.reason == "at target":
                started_ms, from_pages = self._movement
                log.info("balloon %d → %d pages in %d ms: at target (seq %d)", from_pages,
                         self.pinner.held_pages, now - started_ms, self._target_seq)
                self._movement = None
            if self._state != "pressure_deflate" or now >= self._inflate_paused_until_ms:
                self._state = "idle" if not self._pending else self._state
            return False
        if plan.action == "refuse" and plan.transient and self._headroom >= self._batch_limit * PAGE_SIZE_BYTES:
            return False  # this check's swap step is spent; the guest has more: go on at the next check
        if plan.action == "refuse":
            if self._state != "refusing" and plan.transient != self._last_refusal_transient:
                log.info("refusing to inflate: %s", plan.reason)
            self._last_refusal_transient = plan.transient
            self._state = "refusing"
            # Pages already on their way out (unlock sent) are not the guest's to refuse: the
            # shortfall is counted against the balloon that stays. Never below 0 (a status with a
            # negative count is invalid and once killed the agent mid-experiment).
            self._refused_since_target = max(0, self._target_pages - self._effective_balloon_pages())
            self._inflate_paused_until_ms = now + self.pacing.refusal_pause_ms
            return False
        if plan.action == "inflate":
            if self._outbox:
                return False  # queued requests first: a page pinned again must not be locked before its unlock
            self._state = "inflating"
            # Up to `pin_chunk_batches` batches with one mlock, as far as the window has room:
            # their locks then leave back to back (one wakeup of libzmq's I/O thread, not one
            # per batch), and the next chunk is pinned while the host answers these.
            slots = max(1, min(self._window() - len(self._pending), self.pacing.pin_chunk_batches))
            count = min(plan.pages, slots * self._batch_limit)
            try:
                batches = self.pinner.pin_batches(count, self._batch_limit)
            except PinError as exc:
                log.error("pinning failed: %s", exc)
                self._rate_batches = agent.next_rate(self._rate_batches, False, self.pacing)
                self._inflate_paused_until_ms = now + self.pacing.refusal_pause_ms
                return False
            # The headroom was measured at the last check; spend it as pages are pinned so that
            # no burst between two checks can pin more than the guest had to give.
            self._givable -= count * PAGE_SIZE_BYTES
            self._pinned_since_check = True
            for batch in batches:
                self._request(Lock(pages=batch.pages, adopt=False), batch)
            return True
        self._state = "deflating"
        leaving = {p.batch.offset_pages for p in self._pending.values() if p.kind == "unlock" and p.batch}
        excess = plan.pages
        if not self._reclaim:
            # Free first, report after, as a pressure deflate does: hostd answers every unlock
            # OK or UNKNOWN and never keeps a page, so the guest's memory need not wait for
            # 512 round trips a GiB (issue 18: deflate at the speed of munlock). The unlocks
            # follow as the window allows; nothing is pinned again before they have all left.
            freed: list[tuple[int, int]] = []
            for batch in self.pinner.batches_from_top():
                if excess <= 0:
                    break
                if batch.offset_pages not in leaving:
                    self.pinner.release(batch)
                    self.counters.deflated_pages += batch.page_count
                    excess -= batch.page_count
                    freed.extend(batch.pages.ranges)
            for chunk in PageRanges.from_ranges(freed).split(self._batch_limit, MAX_RANGES_PER_MESSAGE):
                self._queue(Unlock(pages=chunk), None)
            return self._send_outbox() or bool(freed)
        # Reclaim mode: hostd lowered the guest's limit by these pages; they are the guest's
        # again only once hostd has taken them out of its ledger (and raised the limit).
        slots = self._window() - len(self._pending)
        sent = 0
        for batch in self.pinner.batches_from_top():
            if sent >= slots or excess <= 0:
                break
            if batch.offset_pages not in leaving:
                self._request(Unlock(pages=batch.pages), batch)
                sent += 1
                excess -= batch.page_count
        return sent > 0

    def _deflate_without_host(self, now: int) -> None:
        """Host gone past the grace period: give the guest its memory back, gradually."""
        if not self.pinner.held_pages or now < self._lost_deflate_due_ms:
            return
        batch = self.pinner.release_last()
        self.counters.deflated_pages += batch.page_count
        self._unsettled_unlocks.append(batch.pages)
        self._lost_deflate_due_ms = now + max(1, 1000 * batch.page_count // self.cfg.lost_deflate_pages_per_s)
        if not self.pinner.held_pages:
            log.warning("host gone for over %d ms: balloon fully deflated", self.cfg.host_grace_ms)

    # ---- reports ---------------------------------------------------------------------
    def _report(self, now: int) -> None:
        reading = self._last_reading
        stats = reading.as_stats() if reading else {}
        stats["givable_bytes"] = self._givable
        stats["balloon_returned_bytes"] = self.pinner.dropped_pages * PAGE_SIZE_BYTES
        stats["pressure_deflates"] = self.counters.pressure_deflates
        stats["expired_requests"] = self.counters.expired_requests
        stats["absurd_target_seqs"] = self.counters.absurd_target_seqs
        stats["ws_samples"] = self._ws_samples
        current = self.sampler.current(now, reading) if reading else None
        self._ws_current = current
        if current is not None:
            stats["ws_current_ratio"] = current.ratio
        if self.cfg.workload_report is not None:
            # Not written yet, or the workload is gone: its figures are then simply unknown.
            with contextlib.suppress(OSError):
                stats.update(agent.workload_stats(self.cfg.workload_report.read_text(), time.time()))
        last = self._last_ws
        method_source = last or current
        self._send(Status(
            balloon_pages=self.pinner.held_pages, acked_target_seq=self._target_seq,
            refused_pages=max(0, min(self._refused_since_target, self.memsz_bytes // PAGE_SIZE_BYTES)),
            agent_state=self._state,
            stats=stats_values(STATS_KEYS, {k: v for k, v in stats.items() if not isinstance(v, bool)}),
            ws_touched_ratio=last.ratio if last else None,
            ws_method=method_source.method if method_source else "none",
            ws_period_ms=last.period_ms if last else 0,
        ))

    def _shutdown(self) -> None:
        held = self.pinner.held_pages
        freed = self.pinner.release_all()
        self.counters.deflated_pages += freed
        if self._registered:
            self._send(Bye(reason=f"agent stopping; released {held} pages"))
        log.info("stopped: released %d pages, said bye", freed)
        self.pinner.close()
        if self.alarm is not None:
            self.alarm.close()
        if self.socket is not None:
            self.socket.close(linger=100)

