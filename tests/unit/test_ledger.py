from hypothesis import given
from hypothesis import strategies as st

from hostd.ledger import Ledger, RangeSet
from protocol import PageRanges, RangeStatus

OK, DUP, REF, UNK = RangeStatus.OK, RangeStatus.DUPLICATE, RangeStatus.REFUSED, RangeStatus.UNKNOWN


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


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 200), st.integers(1, 30)), max_size=60))
def test_rangeset_matches_a_plain_set(operations):
    ranges, model = RangeSet(), set()
    for add, start, count in operations:
        pages = set(range(start, start + count))
        if add:
            if not (pages & model):
                ranges.add(start, start + count)
                model |= pages
            assert ranges.overlaps(start, start + count) == bool(pages & model)
        else:
            assert ranges.remove(start, start + count) == len(pages & model)
            model -= pages
        assert ranges.page_count == len(model)
        assert sorted(p for s, c in ranges.ranges() for p in range(s, s + c)) == sorted(model)
        got = ranges.ranges()
        assert all(got[i][0] + got[i][1] < got[i + 1][0] for i in range(len(got) - 1))  # merged
