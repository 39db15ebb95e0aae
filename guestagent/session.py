"""The agent as a sans-IO session: frames, guest readings, working-set samples and the time
go in; numbered messages (and "reconnect") come out, and pages move through an injected
`Pinner`. No sockets, no clock reads, no file I/O: `guestagent.client` owns those and calls
in here, and tests drive the same object with a `FakePinner` and `hostd.core.HostCore`.

    session = AgentSession(cfg, pinner, memsz_bytes, cgroup_version, first_reading)
    session.start(now)                                 # the first sampling period starts
    session.on_frame(frame, now)                       # a frame from the host
    session.on_send(delivered, now)                    # did a send get through (ZMQ_IMMEDIATE)?
    if session.due_check(now): session.on_reading(reading, host_swap_free, host_available, now)
    session.tick(now)                                  # host loss, expiry, hello, one motion step
    if session.due_ws_period(now): session.end_ws_period(sample)
    if session.due_report(now): session.report(now, current_sample, workload_stats)
    session.take_actions()                             # [Send(seq, message) | Reconnect(), ...]
    session.poll_timeout_ms(now)                       # how long the loop may sleep

The state is grouped by job: `Registration` (the host session, its secret, reachability and
hello backoff), `Motion` (guestagent.motion: target, requests in flight, rate, refusals,
deflates), `PressureMemory` (the last readings and the backoff) and `Sampling` (working-set
periods). Every decision comes from `guestagent.agent`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from guestagent import agent
from guestagent.cgroup import GuestReading
from guestagent.config import AgentConfig
from guestagent.motion import Motion
from guestagent.pinning import Pinner
from guestagent.report import STATS_KEYS, StatusInputs, build_status
from guestagent.state import Action, AgentState, Counters, PressureMemory, Registration, Sampling, Wire
from guestagent.wss import Sample
from protocol import (
    PAGE_SIZE_BYTES,
    Bye,
    Error,
    ErrorCode,
    Heartbeat,
    Hello,
    LockResult,
    Message,
    ProtocolError,
    SetTarget,
    Settings,
    UnlockResult,
    Welcome,
    decode,
)

log = logging.getLogger(__name__)

AGENT_VERSION = "0.1.0"



class AgentSession:
    def __init__(self, cfg: AgentConfig, pinner: Pinner, memsz_bytes: int, cgroup_version: int,
                 first_reading: GuestReading | None = None) -> None:
        self.cfg = cfg
        self.pinner = pinner
        self.memsz_bytes = memsz_bytes
        self.cgroup_version = cgroup_version
        self.pacing = agent.PacingConfig(batch_pages=cfg.batch_pages)
        self.wire = Wire()
        self.counters = Counters()
        self.pressure = PressureMemory(last_reading=first_reading)
        self.motion = Motion(pinner, self.pacing, self.wire, self.counters, self.pressure, cfg.batch_pages)
        self.reg = Registration()
        self.bye_seq: int | None = None  # the seq of the bye sent at shutdown (None: none sent)
        self.sampling = Sampling(report_interval_ms=cfg.report_interval_ms,
                                 host_timeout_ms=5 * cfg.report_interval_ms, ws_period_ms=cfg.ws_period_ms)

    # ---- what the loop asks -----------------------------------------------------------
    @property
    def registered(self) -> bool:
        return self.reg.registered

    @property
    def state(self) -> AgentState:
        return self.motion.state

    @property
    def host_timeout_ms(self) -> int:
        return self.sampling.host_timeout_ms

    @property
    def last_reading(self) -> GuestReading | None:
        return self.pressure.last_reading

    @property
    def moving(self) -> bool:
        """Requests in flight or the balloon away from its target (libzmq's I/O thread as SCHED_BATCH)."""
        m = self.motion
        return self.reg.registered and (bool(m.pending) or m.target.pages != self.pinner.held_pages)

    def take_actions(self) -> list[Action]:
        return self.wire.take()

    def poll_timeout_ms(self, now: int) -> int:
        if self.reg.registered and self.motion.busy() and now >= self.motion.inflate_paused_until_ms:
            return 0
        s = self.sampling
        deadlines = [s.next_report_ms, s.next_check_ms, s.next_ws_ms]
        if not self.reg.registered:
            deadlines.append(self.reg.next_hello_ms)
        return max(0, min(min(deadlines) - now, 1000))

    def start(self, now: int) -> None:
        self.sampling.next_ws_ms = now + self.sampling.ws_period_ms

    # ---- the connection ---------------------------------------------------------------
    def on_send(self, delivered: bool, now: int) -> None:
        if delivered:
            self.reg.unreachable_since_ms = None  # a connection to the host is up
        elif self.reg.unreachable_since_ms is None:
            self.reg.unreachable_since_ms = now

    def on_frame(self, frame: bytes, now: int) -> None:
        self.reg.unreachable_since_ms = None
        try:
            envelope = decode(frame)
        except ProtocolError as exc:
            self.counters.protocol_errors += 1
            log.warning("bad frame from host: %s", exc)
            return
        self.on_message(envelope.seq, envelope.message, now)

    def on_message(self, seq: int, message: Message, now: int) -> None:
        if isinstance(message, Welcome):
            self._on_welcome(message, now)
        elif not self.reg.registered:
            if isinstance(message, Error):  # a refused hello (or stale traffic): said once per code
                self.counters.protocol_errors += 1
                if message.code != self.reg.last_refusal:
                    self.reg.last_refusal = message.code
                    log.warning("host refused us while unregistered: %s: %s (hello retried with backoff)",
                                ErrorCode.label(message.code), message.detail)
            return  # otherwise stale traffic from before a reconnect
        elif isinstance(message, SetTarget):
            self.motion.on_target(message.target_pages, message.target_seq, now)
        elif isinstance(message, Settings):
            self._on_settings(message, now)
        elif isinstance(message, LockResult):
            self.motion.on_lock_result(seq, message, now)
        elif isinstance(message, UnlockResult):
            self.motion.on_unlock_result(seq, message, now)
        elif isinstance(message, Error):
            self._on_error(message)
        elif isinstance(message, Heartbeat):
            pass
        else:
            log.debug("ignoring %s from host", message.kind)

    def _on_error(self, message: Error) -> None:
        self.counters.protocol_errors += 1
        log.warning("host error %s: %s (in reply to %s)", ErrorCode.label(message.code), message.detail,
                    message.in_reply_to)
        if message.code == ErrorCode.NOT_REGISTERED:  # a new host that does not know us yet
            self.reg.registered = False
            self.motion.settle_pending()
            self.reg.next_hello_ms = 0
            self.reg.hello_backoff_ms = 100
        elif message.code in (ErrorCode.CONFLICT, ErrorCode.ADMISSION_REFUSED):
            # Errors reach here only while registered: the answer to a hello repeated before
            # its welcome came (a slow host), which changed nothing on the host. Unregistering
            # here dropped the results of the locks in flight and left the ledger short.
            pass
        self.motion.pending.pop(message.in_reply_to or -1, None)

    # ---- registration -----------------------------------------------------------------
    def _say_hello(self, now: int) -> None:
        self.wire.send(Hello(
            vm_id=self.cfg.vm_id, memsz_bytes=self.memsz_bytes, agent_version=AGENT_VERSION,
            page_kind=self.pinner.page_kind,  # type: ignore[arg-type]
            supports_2m=self.pinner.huge_pages, cgroup_version=self.cgroup_version,
            max_batch_pages=self.cfg.batch_pages, held_pages=self.pinner.held_pages,
            last_host_session_id=self.reg.host_session, stats_keys=STATS_KEYS,
            vm_secret=self.reg.vm_secret,  # None until a welcome gave one
        ))
        self.reg.next_hello_ms = now + self.reg.hello_backoff_ms
        self.reg.hello_backoff_ms = min(self.reg.hello_backoff_ms * 2, 5_000)

    def _lose_host(self, now: int) -> None:
        log.warning("host unreachable for %d ms: re-registering (balloon %d pages held)",
                    now - (self.reg.unreachable_since_ms or now), self.pinner.held_pages)
        self.reg.host_lost_since_ms = now
        self.motion.state = "host_lost"
        self._reregister(now)

    def _reregister(self, now: int) -> None:
        """Say hello again on a fresh connection. Batches pinned but unconfirmed stay pinned:
        after welcome they are re-reported with adopt=True like the rest of the balloon, and
        unlocks never confirmed are sent again (freed pages must leave the host's ledger,
        which a same-session welcome keeps)."""
        self.reg.registered = False
        self.motion.settle_pending()
        self.reg.hello_backoff_ms = 100
        self.reg.next_hello_ms = now
        self.reg.unreachable_since_ms = None
        self.wire.reconnect()

    def _expire_pending(self, now: int) -> None:
        """A reply that never comes would stall the balloon for good (the window stays full):
        after two host timeouts, re-register and re-adopt (review S19)."""
        pending = self.motion.pending
        oldest = min(p.sent_ms for p in pending.values())
        if now - oldest <= 2 * self.sampling.host_timeout_ms:
            return
        self.counters.expired_requests += len(pending)
        log.warning("%d lock/unlock requests unanswered for %d ms (the host dropped the replies?): "
                    "re-registering and re-adopting %d held pages", len(pending), now - oldest,
                    self.pinner.held_pages)
        self._reregister(now)

    def _on_welcome(self, welcome: Welcome, now: int) -> None:
        reg, s, motion = self.reg, self.sampling, self.motion
        new_session = welcome.host_session_id != reg.host_session
        reg.registered = True
        reg.host_lost_since_ms = None
        reg.last_refusal = None  # a later refusal is news again
        reg.host_session = welcome.host_session_id
        reg.vm_secret = welcome.vm_secret
        timings = agent.welcome_timings(welcome.report_interval_ms, welcome.host_timeout_ms,
                                        welcome.sample_period_ms)
        if timings.floored:
            self.counters.floored_welcomes += 1
            log.warning("welcome asked for %s below the agent's floors: raised to report %d ms, host timeout %d ms, "
                        "sample period ≥ %d ms", ", ".join(timings.floored), timings.report_interval_ms,
                        timings.host_timeout_ms, agent.MIN_SAMPLE_PERIOD_MS)
        s.report_interval_ms = timings.report_interval_ms
        s.host_timeout_ms = timings.host_timeout_ms
        motion.batch_limit = min(self.cfg.batch_pages, welcome.batch_limit_pages)
        motion.reclaim = welcome.reclaim
        if timings.sample_period_ms is not None:
            self._set_sample_period(timings.sample_period_ms, now)
        reg.hello_backoff_ms = 100
        s.next_report_ms = 0
        if new_session:
            motion.target.pages, motion.target.seq = self.pinner.held_pages, 0
            motion.target.absurd_seq_logged = False
        log.info("registered with host session %s (%s); report every %d ms; adopting %d held pages",
                 welcome.host_session_id, "new" if new_session else "same", s.report_interval_ms,
                 self.pinner.held_pages)
        motion.readopt(new_session, now)

    def _on_settings(self, settings: Settings, now: int) -> None:
        """A host setting changed while registered (balloonctl host sample_period=...)."""
        period, floored = agent.floor_sample_period(settings.sample_period_ms)
        if floored:
            self.counters.floored_welcomes += 1
            log.warning("host asked for a %d ms sample period: raised to the agent's floor of %d ms",
                        settings.sample_period_ms, period)
        if period != self.sampling.ws_period_ms:
            log.info("host changed the sample period: %d → %d ms", self.sampling.ws_period_ms, period)
        self._set_sample_period(period, now)

    def _set_sample_period(self, period_ms: int, now: int) -> None:
        """The host's Mem.SamplePeriod governs: the running period ends at the latest one new
        period from now (a shorter period takes effect at once, a longer one at the next end)."""
        s = self.sampling
        s.ws_period_ms = period_ms
        s.next_ws_ms = min(s.next_ws_ms, now + period_ms)

    # ---- the guest --------------------------------------------------------------------
    def due_check(self, now: int) -> bool:
        """Is a guest check due? (Then the next one is scheduled and the caller reads the guest.)"""
        if now < self.sampling.next_check_ms:
            return False
        self.sampling.next_check_ms = now + self.cfg.check_interval_ms
        return True

    def on_alarm(self) -> None:
        """Usage crossed the alarm threshold: check the guest now, not at the next interval
        (at most every 5 ms however often usage swings across it)."""
        s = self.sampling
        s.next_check_ms = min(s.next_check_ms, self.pressure.last_check_ms + 5)

    def alarm_threshold_bytes(self, reading: GuestReading) -> int | None:
        """Wake when the guest's usage comes within two margins of its limit: the balloon
        leaves one margin free, and a workload writing ~1 GB/s fills one (30 MiB of a
        512 MiB guest) in ~30 ms, less than a busy 2-core guest may take to schedule
        the agent and munlock; without swap the charge that finds no room is an OOM kill."""
        if reading.limit_bytes is None:
            return None
        return reading.limit_bytes - 2 * agent.margin_bytes(reading, self.pacing)

    def on_reading(self, reading: GuestReading, host_swap_free_bytes: int, host_available_bytes: int,
                   now: int) -> None:
        """A fresh reading of the guest's cgroup, with the host's swap free and memory
        available: what it can give, and a pressure deflate when it needs memory back."""
        p = self.pressure
        # The balloon's own pages are part of usage; givable counts what is left beyond them.
        p.givable_bytes = agent.givable_bytes(reading, host_swap_free_bytes, host_available_bytes, self.pacing)
        headroom = agent.givable_bytes(reading, host_swap_free_bytes, host_available_bytes, self.pacing,
                                       paced=False)
        p.headroom_bytes = headroom
        interval_s = (now - p.last_check_ms) / 1000 if p.last_check_ms else 0.0
        p.last_check_ms = now
        reason = agent.detect_pressure(p.last_reading, reading, headroom, self.pacing, interval_s,
                                       pinned_since_last=p.pinned_since_check,
                                       soft_signals=agent.soft_pressure_counts(p.backoff, now, self.pacing))
        growth = None
        ref = p.growth_ref
        if ref is None or now - ref[2] >= 20:
            if ref is not None:
                balloon_delta = (self.pinner.held_pages - ref[1]) * PAGE_SIZE_BYTES
                growth = agent.workload_growth(ref[0], reading, balloon_delta, (now - ref[2]) / 1000, self.pacing)
            # The balloon as it was at this reading (before any deflate below): the next
            # growth then counts what is freed now as the balloon's, not as the guest's.
            p.growth_ref = (reading, self.pinner.held_pages, now)
        if reason is None and growth is not None:
            reason, headroom = growth[0], min(headroom, -growth[1])
        p.pinned_since_check = False
        p.last_reading = reading
        if reason and self.pinner.held_pages:
            self.motion.pressure_deflate(now, reason, headroom, self.reg.registered)

    def working_set_cap(self) -> int | None:
        """From accessed bits only: the active-LRU fallback counts idle pages that reclaim has
        not aged yet, which would hold an idle guest's balloon back. The larger of the last
        period and the one running (updated each report), so a workload that wakes up counts
        within a second."""
        s = self.sampling
        samples = [x.ratio for x in (s.last_ws, s.ws_current) if x is not None and x.method == "referenced"]
        reading = self.pressure.last_reading
        limit = reading.limit_bytes if reading else None
        if self.motion.reclaim and limit is not None:
            # The host lowered the limit by the memory the balloon handed back: the guest's
            # size for this cap is still its own limit (never more than it).
            limit = min(self.memsz_bytes, limit + self.pinner.dropped_pages * PAGE_SIZE_BYTES)
        return agent.working_set_cap_pages(limit, self.memsz_bytes, max(samples) if samples else None, self.pacing)

    # ---- the loop's turn ---------------------------------------------------------------
    def tick(self, now: int) -> None:
        """Host loss, expired requests, hello (or the deflate without a host), then motion."""
        reg, motion = self.reg, self.motion
        if (reg.registered and reg.unreachable_since_ms is not None
                and now - reg.unreachable_since_ms > self.sampling.host_timeout_ms):
            self._lose_host(now)
        if reg.registered and motion.pending:
            self._expire_pending(now)
        if not reg.registered:
            if now >= reg.next_hello_ms:
                self._say_hello(now)
            if reg.host_lost_since_ms is not None and now - reg.host_lost_since_ms > self.cfg.host_grace_ms:
                motion.deflate_without_host(now, self.cfg.lost_deflate_pages_per_s, self.cfg.host_grace_ms)
        else:
            motion.send_outbox(now)
            while (not motion.outbox and len(motion.pending) < motion.window()
                   and motion.step(now, self.working_set_cap())):
                pass

    def due_ws_period(self, now: int) -> bool:
        """Has the sampling period ended? (Then the next one is scheduled; the caller samples.)"""
        s = self.sampling
        if now < s.next_ws_ms:
            return False
        s.next_ws_ms = now + s.ws_period_ms
        return True

    def end_ws_period(self, sample: Sample | None) -> None:
        self.sampling.last_ws = sample
        self.sampling.ws_samples += sample is not None

    def due_report(self, now: int) -> bool:
        s = self.sampling
        if now < s.next_report_ms or not self.reg.registered:
            return False
        s.next_report_ms = now + s.report_interval_ms
        return True

    def report(self, current: Sample | None, workload: Mapping[str, int | float] | None = None) -> None:
        """A status (unanswered): `current` is the running sampling period so far, `workload`
        the workload's own figures (agent.workload_stats) when it reports any."""
        self.sampling.ws_current = current
        motion = self.motion
        self.wire.send(build_status(StatusInputs(
            reading=self.pressure.last_reading, givable_bytes=self.pressure.givable_bytes,
            balloon_pages=self.pinner.held_pages, returned_pages=self.pinner.dropped_pages,
            counters=self.counters, target_seq=motion.target.seq, refused_pages=motion.target.refused_pages,
            agent_state=motion.state, memsz_bytes=self.memsz_bytes, last=self.sampling.last_ws, current=current,
            ws_samples=self.sampling.ws_samples, workload=workload)))

    def shutdown(self) -> int:
        """Release everything and say bye (if registered). Returns the pages released."""
        held = self.pinner.held_pages
        freed = self.pinner.release_all()
        self.counters.deflated_pages += freed
        if self.reg.registered:
            self.bye_seq = self.wire.send(Bye(reason=f"agent stopping; released {held} pages"))
        return freed

    def bye_answered(self, frame: bytes) -> bool:
        """After `shutdown`: is this frame the host's answer to our bye (it was read)?"""
        try:
            envelope = decode(frame)
        except ProtocolError:
            return False
        return isinstance(envelope.message, Bye) and envelope.seq == self.bye_seq
