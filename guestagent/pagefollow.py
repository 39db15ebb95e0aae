"""PFN balloons follow their pages: the kernel migrates mlocked pages (compaction, khugepaged
collapsing them into a THP), so the frame numbers the host's ledger holds go stale, and the
next pins get exactly those frames — every lock of them DUPLICATE, the balloon stalled (the
attach stall of issues 15/17). `PageFollowing` is the part of `guestagent.motion.Motion` that
reads the frames again, tells the host (stale unlocked, fresh adopted) and unlocks phantoms:
pages of the vm's own ledger that the balloon does not hold."""

from __future__ import annotations

import logging

from guestagent import agent
from guestagent.pinning import Batch, Pinner
from guestagent.state import Pending
from protocol import Lock, PageRanges, Unlock
from protocol.limits import MAX_RANGES_PER_MESSAGE

log = logging.getLogger("guestagent.motion")

# PFN balloons read their frame numbers again at least this often (pages migrate silently; a
# stale frame in the ledger refuses another PFN vm's pin of it) and after every DUPLICATE.
RENUMBER_PERIOD_MS = 30_000


class PageFollowing:
    """Mixed into Motion, which provides these:"""

    pinner: Pinner
    pending: dict[int, Pending]
    batch_limit: int
    renumbered_pages: int  # frames re-reported after the kernel moved pages
    phantom_unlocked_pages: int  # refused as DUPLICATE, not in the balloon: unlocked
    next_renumber_ms: int

    def queue(self, message: Lock | Unlock, batch: Batch | None) -> None:
        raise NotImplementedError

    def send_outbox(self, now: int) -> bool:
        raise NotImplementedError

    def held_page_numbers(self) -> PageRanges:
        return PageRanges.from_ranges(r for batch in self.pinner.batches for r in batch.pages.ranges)

    def renumber_pages(self) -> tuple[PageRanges, PageRanges]:
        """PFN balloons: read the held batches' frame numbers again. The kernel migrates
        mlocked pages (compaction, compact_unevictable_allowed=1 by default; khugepaged collapsing
        them into a THP), so the host's ledger keeps frames the balloon left, and those are the
        next frames a pin gets: every
        lock of them is DUPLICATE, the batch is freed, pinned again on the same frames and
        refused again (the attach stall of issues 15/17). Returns (stale, fresh): frames the
        host holds for us that the balloon is not on any more, and frames it is on now that
        it never reported. Batches with a lock in flight are read after its answer."""
        if self.pinner.page_kind != "pfn":
            return PageRanges(()), PageRanges(())
        in_flight = frozenset(p.batch.offset_pages for p in self.pending.values() if p.batch is not None)
        reported = self.held_page_numbers()
        moved = self.pinner.renumber(in_flight)
        if not moved:
            return PageRanges(()), PageRanges(())
        now_on = self.held_page_numbers()
        stale = agent.subtract_pages(PageRanges.from_ranges(r for old, _ in moved for r in old.pages.ranges), now_on)
        fresh = agent.subtract_pages(PageRanges.from_ranges(r for _, new in moved for r in new.pages.ranges), reported)
        self.renumbered_pages += fresh.page_count
        log.info("%d balloon pages moved to other frames (page migration): unlocking %d stale frames, "
                 "adopting %d new ones", sum(new.page_count for _, new in moved), stale.page_count, fresh.page_count)
        return stale, fresh

    def queue_moves(self, moves: tuple[PageRanges, PageRanges]) -> None:
        """The ledger follows the frames: stale ones out first, then the new ones in (adopt:
        pages the balloon already holds; their answers change nothing here)."""
        stale, fresh = moves
        for chunk in stale.split(self.batch_limit, MAX_RANGES_PER_MESSAGE):
            self.queue(Unlock(pages=chunk), None)
        for chunk in fresh.split(self.batch_limit, MAX_RANGES_PER_MESSAGE):
            self.queue(Lock(pages=chunk, adopt=True), None)

    def clear_phantoms(self, duplicate: PageRanges, now: int) -> None:
        """A new lock refused as DUPLICATE: the host holds those pages already. The host
        handles our frames in order and we only lock pages we hold, so pages of our own ledger
        that the balloon does not hold now are phantoms — pages it left whose unlock the host
        never got (a send refused while the connection was down, a reply lost before a
        re-hello, PFNs the kernel moved). Each stays DUPLICATE for good, and the next pin gets
        the same frames back (LIFO free lists): the balloon stalls. So: follow moved PFNs, then
        unlock what was refused and is not held (another PFN vm's pages answer UNKNOWN and
        stay its own)."""
        self.follow_moved_pages(now)
        phantoms = agent.subtract_pages(duplicate, self.held_page_numbers())
        if phantoms:
            self.phantom_unlocked_pages += phantoms.page_count
            log.warning("%d pages refused as DUPLICATE are not in the balloon: unlocking them (the host kept "
                        "pages the balloon had left)", phantoms.page_count)
            for chunk in phantoms.split(self.batch_limit, MAX_RANGES_PER_MESSAGE):
                self.queue(Unlock(pages=chunk), None)
            self.send_outbox(now)

    def follow_moved_pages(self, now: int) -> None:
        """Registered: renumber and tell the host now (after a DUPLICATE, and periodically)."""
        self.next_renumber_ms = now + RENUMBER_PERIOD_MS
        moves = self.renumber_pages()
        if moves[0] or moves[1]:
            self.queue_moves(moves)
            self.send_outbox(now)
