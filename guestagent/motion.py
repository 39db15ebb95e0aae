"""The balloon's motion toward the host's target, sans-IO: the target and its seq, the
lock/unlock requests in flight (and the queue waiting for room in the window), the adaptive
rate, refusals, and the deflates (toward the target, under pressure, without a host).

Pages move through the injected `Pinner`; messages go out through a `Wire` that numbers them
and that the caller (`guestagent.client`, or a test) drains. Every decision comes from
`guestagent.agent`; `now_ms` is always passed in. `guestagent.session.AgentSession` owns one
`Motion` and the registration around it.
"""

from __future__ import annotations

import logging
from collections import deque

from guestagent import agent
from guestagent.errors import PinError
from guestagent.pagefollow import RENUMBER_PERIOD_MS, PageFollowing
from guestagent.pinning import Batch, Pinner
from guestagent.state import AgentState, Counters, Pending, PressureMemory, Target, Wire
from protocol import (
    PAGE_SIZE_BYTES,
    Lock,
    LockResult,
    PageRanges,
    RangeResult,
    RangeStatus,
    Unlock,
    UnlockResult,
)
from protocol.limits import MAX_RANGES_PER_MESSAGE

log = logging.getLogger(__name__)



class Motion(PageFollowing):
    def __init__(self, pinner: Pinner, pacing: agent.PacingConfig, wire: Wire, counters: Counters,
                 pressure: PressureMemory, batch_pages: int) -> None:
        self.pinner = pinner
        self.pacing = pacing
        self.wire = wire
        self.counters = counters
        self.pressure = pressure
        self.batch_limit = batch_pages
        self.target = Target()
        self.pending: dict[int, Pending] = {}
        # Requests waiting for room in the window (max_rate_batches in flight): adopt locks after a
        # welcome and unlocks of freed pages. A burst of thousands (a 4 GiB balloon re-adopted)
        # would overrun the socket's high-water mark, and a send refused there is lost.
        self.outbox: deque[tuple[Lock | Unlock, Batch | None]] = deque()
        self.unsettled_unlocks: list[PageRanges] = []  # unlocks whose reply never came: re-sent after welcome
        self.rate_batches = 1
        self.inflate_paused_until_ms = 0
        self.last_refusal_transient: bool | None = None  # logs a refusal once per kind, not per second
        self.state: AgentState = "idle"
        self.reclaim = False  # the host takes the balloon's memory (welcome.reclaim)
        self.lost_deflate_due_ms = 0
        self.renumbered_pages = 0  # PFN balloons: frames re-reported after the kernel moved pages
        self.phantom_unlocked_pages = 0  # refused as DUPLICATE, not in the balloon: unlocked
        self.next_renumber_ms = RENUMBER_PERIOD_MS

    # ---- the window --------------------------------------------------------------------
    def effective_balloon_pages(self) -> int:
        """Pinned pages minus those already on their way out (unlock sent)."""
        leaving = sum(p.batch.page_count for p in self.pending.values() if p.kind == "unlock" and p.batch)
        return self.pinner.held_pages - leaving

    def window(self) -> int:
        """Batches allowed in flight. Inflating: the adaptive rate (vmw_balloon: halve on
        failure, grow on success, at most max_rate_batches). Deflating is never slowed."""
        if self.target.pages < self.effective_balloon_pages():
            return self.pacing.max_rate_batches
        return self.rate_batches

    def busy(self) -> bool:
        """Room in the window and somewhere to go (the caller checks registration)."""
        return (len(self.pending) < self.window()
                and (self.target.pages != self.effective_balloon_pages() or bool(self.outbox)))

    def queue(self, message: Lock | Unlock, batch: Batch | None) -> None:
        self.outbox.append((message, batch))

    def send_outbox(self, now: int) -> bool:
        """Send queued requests while at most max_rate_batches are in flight. An adopt lock of
        a batch freed meanwhile (pressure) is dropped: its pages are not the balloon's now."""
        sent = False
        while self.outbox and len(self.pending) < self.pacing.max_rate_batches:
            message, batch = self.outbox.popleft()
            if batch is not None and not self.pinner.holds(batch):
                continue
            self.request(message, batch, now, adopt=isinstance(message, Lock) and message.adopt)
            sent = True
        return sent

    def request(self, message: Lock | Unlock, batch: Batch | None, now: int, adopt: bool = False) -> None:
        seq = self.wire.send(message)
        pages = message.pages if isinstance(message, Unlock) else None
        self.pending[seq] = Pending("lock" if isinstance(message, Lock) else "unlock", batch, adopt=adopt,
                                    sent_ms=now, pages=pages)

    def settle_pending(self) -> None:
        """Connection gone: queued unlocks and unlocks of freed pages are kept for the next
        welcome; everything still held is re-adopted then."""
        self.unsettled_unlocks.extend(m.pages for m, _ in self.outbox if isinstance(m, Unlock))
        self.outbox.clear()  # adopt locks: everything held is re-adopted after the next welcome
        for pending in self.pending.values():
            # A batch still pinned is re-adopted instead; only freed pages need the unlock.
            if (pending.kind == "unlock" and pending.pages is not None
                    and (pending.batch is None or not self.pinner.holds(pending.batch))):
                self.unsettled_unlocks.append(pending.pages)
        self.pending.clear()

    def readopt(self, new_session: bool, now: int) -> None:
        """After a welcome: unlocks never confirmed (same host session only), then adopt locks
        of everything held, as the window allows. PFNs are read again first: the adopt locks
        report the frames the balloon is on now, not the ones it was pinned on."""
        unsettled, self.unsettled_unlocks = self.unsettled_unlocks, []
        moves = self.renumber_pages()  # nothing is in flight after settle_pending
        if not new_session:  # a new host never had them in its ledger
            if unsettled:
                # First (the host handles our frames in order), and only what the balloon does
                # not hold again: the adopt locks below then re-report everything it holds.
                freed = agent.subtract_pages(PageRanges.from_ranges(r for pages in unsettled for r in pages.ranges),
                                             self.held_page_numbers())
                for chunk in freed.split(self.batch_limit, MAX_RANGES_PER_MESSAGE):
                    self.queue(Unlock(pages=chunk), None)
            self.queue_moves(moves)
        for batch in self.pinner.batches:
            for chunk in batch.pages.split(self.batch_limit, MAX_RANGES_PER_MESSAGE):
                self.queue(Lock(pages=chunk, adopt=True), batch)
        self.send_outbox(now)

    # ---- PFNs that moved ---------------------------------------------------------------
    # ---- the host's answers ------------------------------------------------------------
    def on_target(self, target_pages: int, target_seq: int, now: int) -> None:
        # seq 0 = the host has not set a target for this session yet; older seqs are stale.
        verdict = agent.classify_target_seq(target_seq, self.target.seq, now - self.target.seq_ms)
        if verdict == "stale":
            return
        if verdict == "absurd":
            self.counters.absurd_target_seqs += 1
            if not self.target.absurd_seq_logged:
                self.target.absurd_seq_logged = True
                log.warning("ignoring a target with seq %d, %d above the last one (%d): not this host's "
                            "(logged once per session; counted)", target_seq, target_seq - self.target.seq,
                            self.target.seq)
            return
        if target_seq != self.target.seq:
            self.target.seq_ms = now
        target = min(target_pages, self.pinner.capacity_pages)
        if target != self.target.pages:
            log.info("target %d → %d pages (seq %d)", self.target.pages, target, target_seq)
            self.target.movement = (now, self.pinner.held_pages)
            self.target.refused_pages = 0
        self.target.pages, self.target.seq = target, target_seq

    @staticmethod
    def _results_ok(results: tuple[RangeResult, ...], kinds: tuple[RangeStatus, ...]) -> bool:
        return all(result.status in kinds for result in results)

    def on_lock_result(self, seq: int, result: LockResult, now: int) -> None:
        self.on_target(result.target_pages, result.target_seq, now)
        pending = self.pending.pop(seq, None)  # the host replies with the request's seq
        if pending is None or pending.kind != "lock" or pending.batch is None:
            return
        if not self.pinner.holds(pending.batch):
            return  # freed under pressure meanwhile; the unlock sent then settles the ledger
        accepted = (RangeStatus.OK, RangeStatus.DUPLICATE) if pending.adopt else (RangeStatus.OK,)
        if self._results_ok(result.results, accepted):
            if self.reclaim:
                self.pinner.drop_backing(pending.batch)
            if not pending.adopt:
                self.counters.inflated_pages += pending.batch.page_count
                self.rate_batches = agent.next_rate(self.rate_batches, True, self.pacing)
            return
        # The host refused some of it: free the whole batch; tell the host about parts it took.
        refused = sum(r.count for r in result.results if r.status not in accepted)
        self.counters.refused_pages += refused
        self.target.refused_pages += refused
        self.rate_batches = agent.next_rate(self.rate_batches, False, self.pacing)
        self.inflate_paused_until_ms = now + self.pacing.refusal_pause_ms
        taken = PageRanges.from_ranges((r.start, r.count) for r in result.results if r.status in accepted)
        self.pinner.release(pending.batch)
        log.info("host refused %d pages of a lock (%s): released the batch",
                 refused, sorted({r.status.name for r in result.results}))
        if taken:
            self.queue(Unlock(pages=taken), None)
            self.send_outbox(now)
        duplicate = PageRanges.from_ranges((r.start, r.count) for r in result.results
                                           if r.status == RangeStatus.DUPLICATE)
        if duplicate and not pending.adopt:
            self.clear_phantoms(duplicate, now)

    def on_unlock_result(self, seq: int, result: UnlockResult, now: int) -> None:
        self.on_target(result.target_pages, result.target_seq, now)
        pending = self.pending.pop(seq, None)
        if pending is None or pending.kind != "unlock" or pending.batch is None:
            return
        if self._results_ok(result.results, (RangeStatus.OK, RangeStatus.UNKNOWN)):
            if self.pinner.holds(pending.batch):
                self.pinner.release(pending.batch)
                self.counters.deflated_pages += pending.batch.page_count
        else:
            log.warning("host kept pages of an unlock %s: balloon keeps them", [r.status.name for r in result.results])

    # ---- inflate / deflate -------------------------------------------------------------
    def pressure_deflate(self, now: int, reason: str, headroom: int, registered: bool) -> None:
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
        backoff = self.pressure.backoff = agent.after_pressure(self.pressure.backoff, self.pinner.held_pages, now,
                                                               self.pacing)
        self.last_refusal_transient = None
        self.inflate_paused_until_ms = max(self.inflate_paused_until_ms, backoff.paused_until_ms)
        self.state = "pressure_deflate"
        log.warning("deflate %d pages at once: %s; inflation paused %d ms, then held below %d pages "
                    "(pressure episode %d in a row)", freed, reason, backoff.paused_until_ms - now,
                    backoff.ceiling_pages, backoff.episodes_in_row)
        # In-flight locks of freed batches are answered later and then ignored: the host
        # handles our messages in order, so the unlocks below remove what they added (and
        # queued adopt locks of freed batches are never sent).
        if registered and freed_ranges:
            for chunk in PageRanges.from_ranges(freed_ranges).split(self.batch_limit, MAX_RANGES_PER_MESSAGE):
                self.queue(Unlock(pages=chunk), None)
            self.send_outbox(now)
        elif freed_ranges:  # told after the next welcome (a same-session host keeps its ledger)
            self.unsettled_unlocks.append(PageRanges.from_ranges(freed_ranges))

    def step(self, now: int, working_set_cap: int | None) -> bool:
        """One batch toward the target. Returns whether a request was sent."""
        if now >= self.next_renumber_ms and self.pinner.page_kind == "pfn" and not self.outbox:
            self.follow_moved_pages(now)
            if self.outbox or len(self.pending) >= self.window():
                return False
        pressure = self.pressure
        plan = agent.plan(
            balloon_pages=self.effective_balloon_pages(), target_pages=self.target.pages,
            givable=pressure.givable_bytes, rate_batches=self.rate_batches, now_ms=now,
            inflate_paused_until_ms=self.inflate_paused_until_ms, cfg=self.pacing,
            ceiling_pages=agent.inflate_ceiling_pages(pressure.backoff, now, self.pacing),
            working_set_cap=working_set_cap,
        )
        if plan.action == "hold":
            if self.target.movement is not None and not self.pending and plan.reason == "at target":
                started_ms, from_pages = self.target.movement
                log.info("balloon %d → %d pages in %d ms: at target (seq %d)", from_pages,
                         self.pinner.held_pages, now - started_ms, self.target.seq)
                self.target.movement = None
            if self.state != "pressure_deflate" or now >= self.inflate_paused_until_ms:
                self.state = "idle" if not self.pending else self.state
            return False
        if (plan.action == "refuse" and plan.transient
                and pressure.headroom_bytes >= self.batch_limit * PAGE_SIZE_BYTES):
            return False  # this check's swap step is spent; the guest has more: go on at the next check
        if plan.action == "refuse":
            if self.state != "refusing" and plan.transient != self.last_refusal_transient:
                log.info("refusing to inflate: %s", plan.reason)
            self.last_refusal_transient = plan.transient
            self.state = "refusing"
            # Pages already on their way out (unlock sent) are not the guest's to refuse: the
            # shortfall is counted against the balloon that stays. Never below 0 (a status with a
            # negative count is invalid and once killed the agent mid-experiment).
            self.target.refused_pages = max(0, self.target.pages - self.effective_balloon_pages())
            self.inflate_paused_until_ms = now + self.pacing.refusal_pause_ms
            return False
        if plan.action == "inflate":
            return self._inflate(now, plan.pages)
        return self._deflate(now, plan.pages)

    def _inflate(self, now: int, pages: int) -> bool:
        if self.outbox:
            return False  # queued requests first: a page pinned again must not be locked before its unlock
        self.state = "inflating"
        # Up to `pin_chunk_batches` batches with one mlock, as far as the window has room:
        # their locks then leave back to back (one wakeup of libzmq's I/O thread, not one
        # per batch), and the next chunk is pinned while the host answers these.
        slots = max(1, min(self.window() - len(self.pending), self.pacing.pin_chunk_batches))
        count = min(pages, slots * self.batch_limit)
        try:
            batches = self.pinner.pin_batches(count, self.batch_limit)
        except PinError as exc:
            log.error("pinning failed: %s", exc)
            self.rate_batches = agent.next_rate(self.rate_batches, False, self.pacing)
            self.inflate_paused_until_ms = now + self.pacing.refusal_pause_ms
            return False
        # The headroom was measured at the last check; spend it as pages are pinned so that
        # no burst between two checks can pin more than the guest had to give.
        self.pressure.givable_bytes -= count * PAGE_SIZE_BYTES
        self.pressure.pinned_since_check = True
        for batch in batches:
            self.request(Lock(pages=batch.pages, adopt=False), batch, now)
        return True

    def _deflate(self, now: int, excess: int) -> bool:
        self.state = "deflating"
        leaving = {p.batch.offset_pages for p in self.pending.values() if p.kind == "unlock" and p.batch}
        if not self.reclaim:
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
            for chunk in PageRanges.from_ranges(freed).split(self.batch_limit, MAX_RANGES_PER_MESSAGE):
                self.queue(Unlock(pages=chunk), None)
            return self.send_outbox(now) or bool(freed)
        # Reclaim mode: hostd lowered the guest's limit by these pages; they are the guest's
        # again only once hostd has taken them out of its ledger (and raised the limit).
        slots = self.window() - len(self.pending)
        sent = 0
        for batch in self.pinner.batches_from_top():
            if sent >= slots or excess <= 0:
                break
            if batch.offset_pages not in leaving:
                self.request(Unlock(pages=batch.pages), batch, now)
                sent += 1
                excess -= batch.page_count
        return sent > 0

    def deflate_without_host(self, now: int, pages_per_s: int, grace_ms: int) -> None:
        """Host gone past the grace period: give the guest its memory back, gradually."""
        if not self.pinner.held_pages or now < self.lost_deflate_due_ms:
            return
        batch = self.pinner.release_last()
        self.counters.deflated_pages += batch.page_count
        self.unsettled_unlocks.append(batch.pages)
        self.lost_deflate_due_ms = now + max(1, 1000 * batch.page_count // pages_per_s)
        if not self.pinner.held_pages:
            log.warning("host gone for over %d ms: balloon fully deflated", grace_ms)
