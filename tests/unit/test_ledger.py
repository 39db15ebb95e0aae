from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hostd.ledger import Ledger, RangeSet
from protocol import PageRanges, RangeStatus
from protocol.limits import MAX_PAGE_NUMBER
from tests.conftest import hypothesis_examples

OK, DUP, REF, UNK = RangeStatus.OK, RangeStatus.DUPLICATE, RangeStatus.REFUSED, RangeStatus.UNKNOWN
INV = RangeStatus.INVALID


def statuses(results):
    return [r.status for r in results]


def test_lock_unlock_per_range():
    ledger = Ledger()
    ledger.register("a", "vpn")
    assert statuses(ledger.lock("a", PageRanges(((0, 10), (20, 5))), 100, False)) == [OK, OK]
    assert ledger.held_pages("a") == 15
    assert statuses(ledger.lock("a", PageRanges(((5, 2), (40, 5))), 100, False)) == [DUP, OK]
    assert statuses(ledger.lock("a", PageRanges(((60, 90),)), 100, False)) == [REF]
    assert statuses(ledger.unlock("a", PageRanges(((0, 10), (100, 1)))) ) == [OK, UNK]
    assert ledger.held_pages("a") == 10


def test_adopt_accepts_own_pages_only():
    ledger = Ledger()
    ledger.register("a", "vpn")
    ledger.lock("a", PageRanges(((0, 10),)), 100, False)
    assert statuses(ledger.lock("a", PageRanges(((0, 10), (12, 3))), 100, True)) == [OK, OK]
    assert statuses(ledger.lock("a", PageRanges(((14, 3),)), 100, True)) == [DUP]  # only partly ours


def test_pfns_are_machine_wide_vpns_are_not():
    ledger = Ledger()
    ledger.register("a", "pfn")
    ledger.register("b", "pfn")
    ledger.register("c", "vpn")
    ledger.lock("a", PageRanges(((100, 10),)), 100, False)
    assert statuses(ledger.lock("b", PageRanges(((105, 1),)), 100, False)) == [DUP]
    assert statuses(ledger.lock("c", PageRanges(((105, 1),)), 100, False)) == [OK]
    assert ledger.pop("a") == 10
    assert statuses(ledger.lock("b", PageRanges(((105, 1),)), 100, False)) == [OK]


@settings(max_examples=hypothesis_examples(100))
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 200), st.integers(1, 30)), max_size=60),
       st.sampled_from([1, 2, 512]))
def test_rangeset_matches_a_plain_set(operations, chunk_ranges):
    ranges, model = RangeSet(chunk_ranges), set()
    for add, start, count in operations:
        pages = set(range(start, start + count))
        if add:
            if not (pages & model):
                ranges.add(start, start + count)
                model |= pages
            assert ranges.overlaps(start, start + count) == bool(pages & model)
            assert ranges.contains(start, start + count) == (pages <= model)
            assert ranges.covered(start, start + count) == len(pages & model)
        else:
            assert ranges.remove(start, start + count) == len(pages & model)
            model -= pages
        assert ranges.page_count == len(model)
        assert sorted(p for s, c in ranges.ranges() for p in range(s, s + c)) == sorted(model)
        got = ranges.ranges()
        assert all(got[i][0] + got[i][1] < got[i + 1][0] for i in range(len(got) - 1))  # merged


# ---- bounds: max_pfn, the per-vm range limit, a page kind that changes --------------------
def test_pfns_beyond_max_pfn_are_invalid_vpns_are_not():
    ledger = Ledger(max_pfn=1000)
    ledger.register("a", "pfn")
    ledger.register("v", "vpn")
    assert statuses(ledger.lock("a", PageRanges(((990, 10), (1001, 1))), 100, False)) == [OK, INV]
    assert statuses(ledger.lock("a", PageRanges(((998, 5),)), 100, False)) == [INV]  # straddles the end
    assert statuses(ledger.lock("v", PageRanges(((5000, 1),)), 100, False)) == [OK]
    assert statuses(ledger.unlock("a", PageRanges(((1000, 1),)))) == [UNK]  # never held
    assert ledger.held_pages("a") == 10


def test_default_max_pfn_is_the_protocol_page_space():
    ledger = Ledger()
    ledger.register("a", "pfn")
    assert statuses(ledger.lock("a", PageRanges(((MAX_PAGE_NUMBER - 1, 1),)), 1, False)) == [OK]


def test_range_limit_per_vm_refuses_new_ranges_but_not_merges():
    ledger = Ledger(max_ranges_per_vm=2)
    ledger.register("a", "vpn")
    assert statuses(ledger.lock("a", PageRanges(((0, 1), (10, 1), (20, 1))), 100, False)) == [OK, OK, REF]
    assert ledger.held_ranges("a") == 2
    # Growing a range, or joining two, adds no range: still OK at the limit.
    assert statuses(ledger.lock("a", PageRanges(((1, 1), (11, 1))), 100, False)) == [OK, OK]
    assert statuses(ledger.lock("a", PageRanges(((2, 8),)), 100, False)) == [OK]
    assert ledger.held_ranges("a") == 1 and ledger.held_pages("a") == 12
    assert statuses(ledger.lock("a", PageRanges(((30, 1),)), 100, False)) == [OK]
    # At the limit an unlock that cuts a hole is refused (nothing removed); one that trims is not.
    assert statuses(ledger.unlock("a", PageRanges(((5, 1), (11, 1))))) == [REF, OK]


def test_page_kind_change_drops_the_ledger():
    ledger = Ledger()
    ledger.register("a", "vpn")
    ledger.lock("a", PageRanges(((0, 10),)), 100, False)
    ledger.register("a", "vpn")  # the same kind again (same session): kept
    assert ledger.held_pages("a") == 10
    ledger.register("a", "pfn")  # VPNs read as PFNs name other pages
    assert ledger.held_pages("a") == 0
    ledger.register("b", "pfn")
    assert statuses(ledger.lock("b", PageRanges(((0, 10),)), 100, False)) == [OK]


def test_pfn_index_follows_unlock_and_pop():
    ledger = Ledger()
    for vm in ("a", "b"):
        ledger.register(vm, "pfn")
    ledger.lock("a", PageRanges(((0, 100),)), 1000, False)
    ledger.unlock("a", PageRanges(((10, 10),)))
    assert statuses(ledger.lock("b", PageRanges(((5, 1), (10, 10), (25, 1))), 1000, False)) \
        == [DUP, OK, DUP]
    assert statuses(ledger.unlock("b", PageRanges(((0, 100),)))) == [UNK]  # b held 10 of them
    assert statuses(ledger.lock("a", PageRanges(((10, 10),)), 1000, False)) == [OK]
    assert ledger.pop("a") == 100
    assert statuses(ledger.lock("b", PageRanges(((0, 100),)), 1000, False)) == [OK]


def test_unknown_vm_pops_nothing():
    assert Ledger().pop("nobody") == 0


# ---- the ledger against a reference model of plain sets -----------------------------------
VMS = ("a", "b", "c", "d")
PAGE_SPACE = 160  # small, so ranges collide, merge, split and cross max_pfn
MODEL_MAX_PFN = 128
MODEL_MAX_RANGES = 4


def _runs(pages: set[int]) -> int:
    return sum(1 for p in pages if p - 1 not in pages)


page_ranges = st.lists(st.tuples(st.integers(0, PAGE_SPACE - 1), st.integers(1, 24)), max_size=6).map(
    PageRanges.from_ranges)


class LedgerModel(RuleBasedStateMachine):
    """Ledger vs sets of pages: per-range results, held pages, ranges and the PFN index."""

    def __init__(self) -> None:
        super().__init__()
        # Chunks of 1–2 ranges: the index's chunks split, empty and refill all the time.
        self.ledger = Ledger(max_pfn=MODEL_MAX_PFN, max_ranges_per_vm=MODEL_MAX_RANGES, chunk_ranges=1)
        self.kinds: dict[str, str] = {}
        self.held: dict[str, set[int]] = {}

    def _pfn_pages(self, other_than: str) -> set[int]:
        return set().union(*(self.held[v] for v, kind in self.kinds.items() if kind == "pfn" and v != other_than))

    @rule(vm=st.sampled_from(VMS), kind=st.sampled_from(["pfn", "vpn"]))
    def register(self, vm, kind):
        self.ledger.register(vm, kind)
        if self.kinds.get(vm) != kind:
            self.held[vm] = set()
        self.kinds[vm] = kind

    @rule(vm=st.sampled_from(VMS))
    def pop(self, vm):
        assert self.ledger.pop(vm) == len(self.held.pop(vm, set()))
        self.kinds.pop(vm, None)

    @precondition(lambda self: self.kinds)
    @rule(data=st.data(), pages=page_ranges, cap=st.integers(0, 200), adopt=st.booleans())
    def lock(self, data, pages, cap, adopt):
        vm = data.draw(st.sampled_from(sorted(self.kinds)))
        pfn = self.kinds[vm] == "pfn"
        mine = self.held[vm]
        others = self._pfn_pages(vm) if pfn else set()
        expected = []
        for start, count in pages.ranges:
            wanted = set(range(start, start + count))
            if pfn and start + count > MODEL_MAX_PFN:
                expected.append(INV)
            elif wanted & mine:
                expected.append(OK if adopt and wanted <= mine else DUP)
            elif wanted & others:
                expected.append(DUP)
            elif len(mine) + count > cap or _runs(mine | wanted) > MODEL_MAX_RANGES:
                expected.append(REF)
            else:
                mine |= wanted
                expected.append(OK)
        results = self.ledger.lock(vm, pages, cap, adopt)
        assert [(r.start, r.count) for r in results] == list(pages.ranges)
        assert statuses(results) == expected

    @precondition(lambda self: self.kinds)
    @rule(data=st.data(), pages=page_ranges)
    def unlock(self, data, pages):
        vm = data.draw(st.sampled_from(sorted(self.kinds)))
        mine = self.held[vm]
        expected = []
        for start, count in pages.ranges:
            wanted = set(range(start, start + count))
            if _runs(mine - wanted) > MODEL_MAX_RANGES:
                expected.append(REF)  # a hole that would take the vm past its range limit
                continue
            expected.append(OK if wanted <= mine else UNK)
            mine -= wanted
        assert statuses(self.ledger.unlock(vm, pages)) == expected

    @invariant()
    def same_pages(self):
        for vm in VMS:
            model = self.held.get(vm, set())
            assert self.ledger.held_pages(vm) == len(model)
            assert self.ledger.held_ranges(vm) == _runs(model) <= MODEL_MAX_RANGES
        pfn_union = set().union(*(self.held[v] for v, kind in self.kinds.items() if kind == "pfn"))
        index = self.ledger._pfn_index
        assert {p for s, c in index.ranges() for p in range(s, s + c)} == pfn_union
        assert index.page_count == len(pfn_union)


LedgerModel.TestCase.settings = settings(max_examples=hypothesis_examples(200), stateful_step_count=40,
                                         deadline=None)
test_ledger_matches_a_model = LedgerModel.TestCase
