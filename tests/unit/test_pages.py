import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import PageRanges, ProtocolError
from protocol.limits import MAX_PAGE_NUMBER, MAX_PAGE_RANGES_WIRE_BYTES, MAX_PAGES_PER_MESSAGE, MAX_RANGES_PER_MESSAGE


@pytest.mark.parametrize(
    ("pages", "ranges"),
    [
        ([], ()),
        ([7], ((7, 1),)),
        ([0], ((0, 1),)),
        ([3, 1, 2], ((1, 3),)),
        ([5, 5, 5, 6], ((5, 2),)),
        ([1, 3, 5], ((1, 1), (3, 1), (5, 1))),
        ([10, 11, 12, 20, 21, 2], ((2, 1), (10, 3), (20, 2))),
        ([MAX_PAGE_NUMBER - 1], ((MAX_PAGE_NUMBER - 1, 1),)),
    ],
)
def test_from_pages_table(pages, ranges):
    built = PageRanges.from_pages(pages)
    assert built.ranges == ranges
    assert built.page_count == len(set(pages))
    assert PageRanges.from_wire(built.to_wire()) == built


def test_huge_contiguous_is_one_range_and_tiny():
    one_gib = PageRanges.from_pages(range(1 << 20, (1 << 20) + 262_144))
    assert one_gib.ranges == ((1 << 20, 262_144),)
    assert len(one_gib.to_wire()) <= 8


@pytest.mark.parametrize("bad", [[-1], [MAX_PAGE_NUMBER]])
def test_from_pages_rejects_out_of_space(bad):
    with pytest.raises(ProtocolError):
        PageRanges.from_pages(bad)


@pytest.mark.parametrize(
    "ranges",
    [((5, 1), (3, 1)), ((1, 2), (3, 1)), ((1, 3), (2, 1)), ((1, 0),), ((-1, 1),)],
    ids=["unsorted", "adjacent", "overlapping", "empty-range", "negative"],
)
def test_constructor_accepts_only_canonical(ranges):
    with pytest.raises(ProtocolError):
        PageRanges(ranges)


def test_from_ranges_merges():
    assert PageRanges.from_ranges([(10, 5), (0, 3), (3, 2), (12, 10), (30, 0)]).ranges == ((0, 5), (10, 12))


@pytest.mark.parametrize(
    ("wire", "why"),
    [
        (b"\x80", "truncated"),
        (b"\x01", "odd"),
        (b"\x01\x02\x00\x01", "adjacent"),
        (b"\x01\x00", "zero count"),
        (b"\xff" * 11 + b"\x01\x01", "long varint"),
    ],
)
def test_from_wire_rejects(wire, why):
    with pytest.raises(ProtocolError):
        PageRanges.from_wire(wire)


def test_from_wire_limits_ranges():
    singles = PageRanges.from_pages(range(0, 2 * (MAX_RANGES_PER_MESSAGE + 1), 2))
    with pytest.raises(ProtocolError, match="LIMIT_EXCEEDED"):
        PageRanges.from_wire(singles.to_wire())


@pytest.mark.parametrize(
    ("wire", "why"),
    [
        (b"\x01" * (1 << 20), "1 MiB of 1-byte varints: refused by its length, unread"),
        (b"\x01" * MAX_PAGE_RANGES_WIRE_BYTES, "as long as allowed, but too many varints"),
        (b"\x01" * (2 * MAX_RANGES_PER_MESSAGE + 1), "one varint too many (and odd)"),
        (b"\xff" * MAX_PAGE_RANGES_WIRE_BYTES + b"\x01", "one byte too long"),
    ],
)
def test_from_wire_refuses_oversized_bins_before_parsing(wire, why):
    with pytest.raises(ProtocolError, match="LIMIT_EXCEEDED"):
        PageRanges.from_wire(wire)


def test_largest_messages_still_fit_the_byte_limit():
    """MAX_RANGES_PER_MESSAGE ranges with the largest gaps and counts a message may hold."""
    count = MAX_PAGES_PER_MESSAGE // MAX_RANGES_PER_MESSAGE
    stride = MAX_PAGE_NUMBER // MAX_RANGES_PER_MESSAGE
    widest = PageRanges(tuple((i * stride + stride - count, count) for i in range(MAX_RANGES_PER_MESSAGE)))
    assert PageRanges.from_wire(widest.to_wire()) == widest
    one_huge_range = PageRanges(((MAX_PAGE_NUMBER - MAX_PAGES_PER_MESSAGE, MAX_PAGES_PER_MESSAGE),))
    assert PageRanges.from_wire(one_huge_range.to_wire()) == one_huge_range
    assert len(widest.to_wire()) <= MAX_PAGE_RANGES_WIRE_BYTES


@given(st.lists(st.tuples(st.integers(0, MAX_PAGE_NUMBER - 1), st.integers(1, MAX_PAGES_PER_MESSAGE)), max_size=40))
def test_any_message_sized_set_encodes_within_the_byte_limit(ranges):
    built = PageRanges.from_ranges((s, min(c, MAX_PAGE_NUMBER - s)) for s, c in ranges)
    per_range_bytes = len(built.to_wire()) / max(1, len(built.ranges))
    assert per_range_bytes <= MAX_PAGE_RANGES_WIRE_BYTES / MAX_RANGES_PER_MESSAGE or built.page_count > (
        MAX_PAGES_PER_MESSAGE)


@given(st.lists(st.integers(min_value=0, max_value=1 << 40), max_size=300))
def test_round_trip_property(pages):
    built = PageRanges.from_pages(pages)
    assert sorted(set(pages)) == list(built.iter_pages())
    assert PageRanges.from_wire(built.to_wire()) == built


@given(
    st.lists(st.integers(min_value=0, max_value=5000), max_size=400),
    st.integers(min_value=1, max_value=64),
    st.integers(min_value=1, max_value=8),
)
def test_split_covers_exactly(pages, max_pages, max_ranges):
    built = PageRanges.from_pages(pages)
    chunks = built.split(max_pages, max_ranges)
    assert all(c.page_count <= max_pages and len(c.ranges) <= max_ranges for c in chunks)
    assert [p for c in chunks for p in c.iter_pages()] == list(built.iter_pages())


def test_fragmented_pfns_build_fast_enough_to_be_practical():
    # Not a timing assertion: checks that 262,144 shuffled pages (1 GiB) give the right count.
    rng = random.Random(1)
    pages = rng.sample(range(1 << 24), 262_144)
    built = PageRanges.from_pages(pages)
    assert built.page_count == 262_144
