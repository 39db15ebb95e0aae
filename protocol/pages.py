"""Page-number lists as sorted, merged ranges, and their compact wire form.

A balloon is a set of 4 KiB page numbers (PFNs or VPNs, declared at hello). On the wire a
set travels as `PageRanges`: ranges (start, count), sorted, non-overlapping and
non-adjacent (adjacent ranges are merged), so every set has exactly one encoding.

Wire form (a msgpack `bin`): for each range, two unsigned LEB128 varints,
`gap` = start − end of the previous range (the first range's gap is its start) and `count`.
Canonical form means every gap after the first is ≥ 1 and every count is ≥ 1. A 1 GiB
contiguous balloon is one range (a dozen bytes); fragmented PFNs cost 2–6 bytes per range.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from protocol.errors import ErrorCode, ProtocolError
from protocol.limits import (
    MAX_PAGE_NUMBER,
    MAX_PAGE_RANGES_WIRE_BYTES,
    MAX_PAGES_PER_MESSAGE,
    MAX_RANGES_PER_MESSAGE,
)

_MAX_VARINT_BYTES = 10  # 70 bits: more than any valid value needs
_CONTINUATION_BYTES = bytes(range(0x80, 0x100))  # a varint's bytes but its last


def _invalid(detail: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_FIELD, detail)


@dataclass(frozen=True, slots=True)
class PageRanges:
    """An immutable set of page numbers held as canonical (start, count) ranges.

    Build with `from_pages` (any iterable, any order, duplicates allowed) or `from_ranges`
    (any ranges, merged). The constructor itself accepts canonical ranges only.
    """

    ranges: tuple[tuple[int, int], ...] = ()
    page_count: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        previous_end = -1
        total = 0
        for item in self.ranges:
            start, count = item
            if start < 0 or count < 1 or start + count > MAX_PAGE_NUMBER:
                raise _invalid(f"page range ({start}, {count}) outside 0..{MAX_PAGE_NUMBER}")
            if start <= previous_end:
                raise _invalid(f"page range starting at {start} is unsorted, overlapping or adjacent")
            previous_end = start + count
            total += count
        object.__setattr__(self, "page_count", total)

    # ---- builders -------------------------------------------------------------------
    @classmethod
    def from_pages(cls, pages: Iterable[int]) -> PageRanges:
        """Ranges covering `pages` (any order; duplicates are merged)."""
        ordered = sorted(set(pages))
        if not ordered:
            return cls(())
        if ordered[0] < 0 or ordered[-1] >= MAX_PAGE_NUMBER:
            raise _invalid(f"page number outside 0..{MAX_PAGE_NUMBER - 1}")
        ranges: list[tuple[int, int]] = []
        start = previous = ordered[0]
        for page in ordered[1:]:
            if page != previous + 1:
                ranges.append((start, previous - start + 1))
                start = page
            previous = page
        ranges.append((start, previous - start + 1))
        return cls(tuple(ranges))

    @classmethod
    def from_ranges(cls, ranges: Iterable[tuple[int, int]]) -> PageRanges:
        """Ranges in any order, overlapping or adjacent, merged into canonical form."""
        merged: list[list[int]] = []
        for start, count in sorted(ranges):
            if count < 1:
                if count < 0:
                    raise _invalid(f"negative count in range ({start}, {count})")
                continue
            if merged and start <= merged[-1][0] + merged[-1][1]:
                end = max(merged[-1][0] + merged[-1][1], start + count)
                merged[-1][1] = end - merged[-1][0]
            else:
                merged.append([start, count])
        return cls(tuple((s, c) for s, c in merged))

    # ---- views ----------------------------------------------------------------------
    def __len__(self) -> int:
        return self.page_count

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def iter_pages(self) -> Iterator[int]:
        for start, count in self.ranges:
            yield from range(start, start + count)

    def split(self, max_pages: int, max_ranges: int = MAX_RANGES_PER_MESSAGE) -> list[PageRanges]:
        """Cut into chunks of at most `max_pages` pages and `max_ranges` ranges, in order."""
        if max_pages < 1 or max_ranges < 1:
            raise ValueError("max_pages and max_ranges must be ≥ 1")
        chunks: list[PageRanges] = []
        current: list[tuple[int, int]] = []
        current_pages = 0
        for start, count in self.ranges:
            while count:
                room = max_pages - current_pages
                take = min(room, count)
                current.append((start, take))
                current_pages += take
                start += take
                count -= take
                if current_pages == max_pages or len(current) == max_ranges:
                    chunks.append(PageRanges(tuple(current)))
                    current, current_pages = [], 0
        if current:
            chunks.append(PageRanges(tuple(current)))
        return chunks

    # ---- wire -----------------------------------------------------------------------
    def to_wire(self) -> bytes:
        out = bytearray()
        previous_end = 0
        for start, count in self.ranges:
            _put_varint(out, start - previous_end)
            _put_varint(out, count)
            previous_end = start + count
        return bytes(out)

    @classmethod
    def from_wire(cls, data: bytes) -> PageRanges:
        """Decode and validate; any defect raises ProtocolError (never anything else).

        Bounded work whatever the input: a bin longer than MAX_RANGES_PER_MESSAGE ranges can
        be, or holding more than 2 × MAX_RANGES_PER_MESSAGE varints, is refused unparsed.
        """
        if len(data) > MAX_PAGE_RANGES_WIRE_BYTES:
            raise ProtocolError(
                ErrorCode.LIMIT_EXCEEDED,
                f"page ranges of {len(data)} bytes (limit {MAX_PAGE_RANGES_WIRE_BYTES}: "
                f"{MAX_RANGES_PER_MESSAGE} ranges)",
            )
        # Every varint ends in the one byte of it below 0x80: counted in C, before any parsing.
        varints = len(data.translate(None, _CONTINUATION_BYTES))
        if varints > 2 * MAX_RANGES_PER_MESSAGE:
            raise ProtocolError(
                ErrorCode.LIMIT_EXCEEDED,
                f"{varints // 2} page ranges in one message (limit {MAX_RANGES_PER_MESSAGE})",
            )
        numbers = _read_varints(data)
        if len(numbers) % 2:
            raise _invalid("page ranges: odd number of varints")
        range_count = len(numbers) // 2
        ranges: list[tuple[int, int]] = []
        previous_end = 0
        total = 0
        for index in range(range_count):
            gap, count = numbers[2 * index], numbers[2 * index + 1]
            if index and gap < 1:
                raise _invalid("page ranges: adjacent or overlapping ranges (not canonical)")
            start = previous_end + gap
            ranges.append((start, count))
            previous_end = start + count
            total += count
        if total > MAX_PAGES_PER_MESSAGE:
            raise ProtocolError(
                ErrorCode.LIMIT_EXCEEDED, f"{total} pages in one message (limit {MAX_PAGES_PER_MESSAGE})"
            )
        return cls(tuple(ranges))


def _put_varint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _read_varints(data: bytes) -> list[int]:
    numbers: list[int] = []
    value = 0
    shift = 0
    width = 0
    for byte in data:
        value |= (byte & 0x7F) << shift
        width += 1
        if width > _MAX_VARINT_BYTES:
            raise _invalid("page ranges: varint longer than 10 bytes")
        if byte & 0x80:
            shift += 7
        else:
            numbers.append(value)
            value = shift = width = 0
    if width:
        raise _invalid("page ranges: truncated varint")
    return numbers

