"""PFN agents against the real HostCore (in memory, tests/unit/agent_harness.Loopback) with a
pinner that models the kernel's page frames: frames come off a LIFO free list (a frame freed
is the next one handed out, as the per-CPU lists do), and `migrate` moves pinned pages to
other frames, freeing the old ones — what compaction does to mlocked pages
(compact_unevictable_allowed=1, the default). Measured on this host's kernel 6.18 as root:
after `echo 1 > /proc/sys/vm/compact_memory`, 394..13,172 of 16,384 mlocked pages had new
PFNs, and the next 16,384 pages pinned took 390 of the 394 frames left behind: 5 of their 8
lock batches would collide with the ledger's stale entries (DUPLICATE).

That is the attach stall of issue 15/17 (an attached agent runs as root: its page numbers are
PFNs): each refused batch is freed, pinned again on the same frames, and refused again."""

from __future__ import annotations

import random

import pytest

from guestagent.pinning import FakePinner
from protocol import Lock, LockResult, PageRanges, RangeStatus, Unlock
from tests.unit.agent_harness import Agent, Loopback

FIRST_FRAME = 0x4_0000


class FramePinner(FakePinner):
    """FakePinner's books with PFNs from a model of the kernel's free frames."""

    def __init__(self, capacity_pages: int, spare_frames: int = 4096) -> None:
        super().__init__(capacity_pages)
        self.page_kind = "pfn"
        total = capacity_pages + spare_frames
        self.free = list(range(FIRST_FRAME + total - 1, FIRST_FRAME - 1, -1))  # pop() gives the lowest
        self.frame_of: dict[int, int] = {}  # offset → the frame it is on now

    def _page_numbers(self, offset_pages: int, count: int) -> PageRanges:
        for offset in range(offset_pages, offset_pages + count):
            if offset not in self.frame_of:  # faulted in by mlock
                self.frame_of[offset] = self.free.pop()
        return PageRanges.from_ranges((self.frame_of[o], 1) for o in range(offset_pages, offset_pages + count))

    def release(self, batch):  # type: ignore[no-untyped-def]
        super().release(batch)
        for offset in range(batch.offset_pages + batch.page_count - 1, batch.offset_pages - 1, -1):
            self.free.append(self.frame_of.pop(offset))  # the last freed is the first reused

    def migrate(self, count: int, rng: random.Random) -> int:
        """Move `count` pinned pages to frames taken from the far end of the free list
        (compaction's free scanner), freeing their old frames to its head."""
        held = sorted(self.frame_of)
        moved = rng.sample(held, min(count, len(held)))
        for offset in moved:
            old = self.frame_of[offset]
            self.frame_of[offset] = self.free.pop(0)
            self.free.append(old)
        return len(moved)


def pfn_loopback(**host_config: object) -> Loopback:
    agent = Agent()
    agent.pinner = FramePinner(agent.pinner.capacity_pages)
    agent.session.pinner = agent.pinner
    agent.session.motion.pinner = agent.pinner
    lb = Loopback(agent, **host_config)
    lb.run(50)
    assert lb.session.registered
    return lb


def held_frames(pinner: FramePinner) -> set[int]:
    return set(pinner.frame_of.values())


def ledger_frames(lb: Loopback) -> set[int]:
    ranges = lb.core.ledger._vms[lb.agent.cfg.vm_id].ranges()
    return {page for start, count in ranges for page in range(start, start + count)}


def duplicates(lb: Loopback) -> int:
    return sum(r.count for m in lb.to_agent if isinstance(m, LockResult) for r in m.results
               if r.status == RangeStatus.DUPLICATE)


def test_pinned_pages_moved_by_compaction_leave_stale_ledger_entries_that_the_next_pins_collide_with():
    lb = pfn_loopback()
    lb.set_target(8_000)
    lb.run(3_000)
    assert lb.agent.pinner.held_pages == 8_000 and ledger_frames(lb) == held_frames(lb.agent.pinner)
    lb.agent.pinner.migrate(400, random.Random(7))
    lb.set_target(16_000)
    lb.run(20_000)
    assert lb.agent.pinner.held_pages == 16_000, (
        f"stalled at {lb.agent.pinner.held_pages} pages; {duplicates(lb)} pages refused as DUPLICATE")
    lb.run(4_000)  # a report or two: the books agree, no reset was needed
    assert ledger_frames(lb) == held_frames(lb.agent.pinner)
    assert lb.host_ledger_pages() == 16_000 and lb.core.counters["resets"] == 0


def test_dropped_lock_replies_then_rehello_with_frames_reused_does_not_stall():
    """The suspect of the last session: locks the host took whose replies never came, a
    re-hello (same host session: the ledger is kept), pages freed and their frames reused."""
    lb = pfn_loopback()
    lb.set_target(4_000)
    lb.run(2_000)
    lb.set_target(6_000)
    lb.drop_replies = True
    lb.run(500)
    assert lb.session.motion.pending  # the host took the locks; their results are lost
    lb.drop_replies = False
    lb.set_target(1_000)  # and the balloon must shrink meanwhile: pages freed, frames reused later
    lb.drop_replies = True
    lb.run(12_000, step_ms=50)  # > 2 host timeouts: expiry → re-hello on a new connection
    assert lb.session.counters.expired_requests >= 1
    lb.drop_replies = False
    lb.run(3_000)
    lb.set_target(9_000)
    lb.run(20_000)
    assert lb.agent.pinner.held_pages == 9_000, f"stalled; {duplicates(lb)} pages refused as DUPLICATE"
    lb.run(4_000)
    assert ledger_frames(lb) == held_frames(lb.agent.pinner)


@pytest.mark.parametrize("page_kind", ["pfn", "vpn"])
def test_phantom_pages_in_the_ledger_are_unlocked_when_a_pin_collides_with_them(page_kind):
    """Whatever left them there (an unlock the host never got), pages the host holds for the
    vm that the balloon does not hold make every pin of them DUPLICATE, and the next pin gets
    them again: the agent unlocks them and goes on."""
    lb = pfn_loopback() if page_kind == "pfn" else Loopback(Agent())
    lb.run(50)
    pinner = lb.agent.pinner
    lb.set_target(2_000)
    lb.run(3_000)
    if isinstance(pinner, FramePinner):
        phantom = PageRanges.from_pages(pinner.free[-700:])  # the next frames a pin gets
    else:
        phantom = PageRanges(((pinner.base_vpn + 2_100, 700),))  # the next slots first fit gives
    assert {r.status for r in lb.core.ledger.lock("a", phantom, 1 << 30, True)} == {RangeStatus.OK}
    lb.set_target(9_000)
    lb.run(15_000)
    assert pinner.held_pages == 9_000, f"stalled at {pinner.held_pages}; {duplicates(lb)} pages DUPLICATE"
    assert lb.session.motion.phantom_unlocked_pages >= 700 - 100  # part may have been pinned again meanwhile
    lb.run(4_000)
    assert lb.host_ledger_pages() == 9_000 and lb.core.counters["resets"] == 0


@pytest.mark.parametrize("seed", range(6))
def test_migrations_between_and_during_moves_always_converge(seed):
    """A table of random schedules: targets up and down, pages migrating at any time, replies
    dropped for a while. The balloon reaches each target and the ledger ends equal to the
    frames really pinned."""
    rng = random.Random(seed)
    lb = pfn_loopback()
    pinner = lb.agent.pinner
    assert isinstance(pinner, FramePinner)
    for _ in range(6):
        target = rng.randrange(0, 20_000)
        lb.set_target(target)
        for _ in range(rng.randrange(1, 4)):
            lb.run(rng.randrange(20, 400))
            pinner.migrate(rng.randrange(0, 600), rng)
        if rng.random() < 0.3:
            lb.drop_replies = True
            lb.run(rng.randrange(100, 600))
            lb.drop_replies = False
        lb.run(30_000, step_ms=20)
        assert pinner.held_pages == target, (seed, target, pinner.held_pages, duplicates(lb))
    lb.run(5_000)
    assert ledger_frames(lb) == held_frames(pinner)
    assert not [m for m in lb.to_host if isinstance(m, Unlock | Lock) and not m.pages.ranges]


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from guestagent import agent as agent_rules  # noqa: E402
from guestagent.motion import Motion  # noqa: E402
from guestagent.state import Counters, PressureMemory, Wire  # noqa: E402
from hostd.ledger import Ledger  # noqa: E402


@settings(max_examples=60)
@given(pins=st.lists(st.integers(1, 700), min_size=1, max_size=8), releases=st.sets(st.integers(0, 7)),
       moves=st.lists(st.integers(0, 900), max_size=4), seed=st.integers(0, 2**32 - 1))
def test_renumbered_stale_and_fresh_frames_bring_the_ledger_back_to_the_frames_held(pins, releases, moves, seed):
    rng = random.Random(seed)
    pinner = FramePinner(8 * 700, spare_frames=2048)
    motion = Motion(pinner, agent_rules.PacingConfig(batch_pages=256), Wire(), Counters(), PressureMemory(), 256)
    ledger = Ledger()
    ledger.register("a", "pfn")
    for count in pins:  # pinned and locked, some released again (their frames reused by later pins)
        for batch in pinner.pin_batches(count, 256):
            assert {r.status for r in ledger.lock("a", batch.pages, 1 << 30, False)} == {RangeStatus.OK}
        for index, batch in enumerate(pinner.batches):
            if index in releases and rng.random() < 0.5:
                pinner.release(batch)
                ledger.unlock("a", batch.pages)
    for count in moves:
        pinner.migrate(count, rng)
        stale, fresh = motion.renumber_pages()
        assert not set(stale.iter_pages()) & held_frames(pinner)
        assert set(fresh.iter_pages()) <= held_frames(pinner)
        assert all(r.status == RangeStatus.OK for r in ledger.unlock("a", stale))
        assert all(r.status == RangeStatus.OK for r in ledger.lock("a", fresh, 1 << 30, True))
        ranges = ledger._vms["a"].ranges()
        assert {p for s, c in ranges for p in range(s, s + c)} == held_frames(pinner)
        assert set(motion.held_page_numbers().iter_pages()) == held_frames(pinner)
