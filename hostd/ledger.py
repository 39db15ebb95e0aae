"""The page ledger: which page numbers each vm's balloon holds, as disjoint sorted ranges.

Answers lock/unlock per range, as vmw_balloon's host answers per entry: a lock range that
overlaps what the vm already holds is DUPLICATE (OK when re-adopted after a host restart);
one that would take the balloon past its cap, or the vm's ledger past MAX_RANGES_PER_VM
ranges, is REFUSED; a PFN range beyond the host's frames (`max_pfn`) is INVALID; an unlock of
pages the vm does not hold is UNKNOWN (whatever part it did hold is removed); an unlock that
would cut a hole in a held range of a vm already at MAX_RANGES_PER_VM ranges is REFUSED
(nothing removed: the agent keeps those pages). Pure: no I/O.

PFNs are machine-wide, so for PFN vms a range held by another vm is DUPLICATE too. VPNs are
per-process addresses: two agents may use the same numbers, so VPN vms are never compared.

Cost: every range of a lock or unlock is O(log n) in the ranges held (bisects over sorted
chunks, see RangeSet), plus the same per held range an unlock removes or cuts. The PFN
duplicate check is one lookup per range in a single index of every PFN vm's ranges (their
union), however many PFN vms there are: a lock range that does not overlap the vm's own ranges
but overlaps the union overlaps another vm's.
"""

from __future__ import annotations

from bisect import bisect_right

from protocol import PageRanges, RangeResult, RangeStatus
from protocol.limits import MAX_PAGE_NUMBER, MAX_RANGES_PER_VM

_CHUNK_RANGES = 512  # a chunk splits in two past twice this
_NO_PAGE = MAX_PAGE_NUMBER + 1  # "no range after": beyond every page number

# RangeSet.probe: (chunk, index) of the range before, its end (−1: none), (chunk, index) of the
# range after, its start (_NO_PAGE: none).
Probe = tuple[int, int, int, int, int, int]


class RangeSet:
    """Disjoint, sorted, merged [start, end) ranges.

    Held as sorted chunks of at most 2 × _CHUNK_RANGES ranges (parallel lists of starts and
    ends) with a list of each chunk's first start: finding a page's range is two C bisects
    (O(log n)); an insert or delete moves at most one chunk's items, plus, once per
    _CHUNK_RANGES inserts, one entry of the chunk list (n / _CHUNK_RANGES items). The same
    layout as sortedcontainers' SortedList, without its positional index, which cost more per
    lookup than everything else here.
    """

    __slots__ = ("_chunk_ranges", "_ends", "_firsts", "_range_count", "_starts", "page_count")

    def __init__(self, chunk_ranges: int = _CHUNK_RANGES) -> None:
        self._chunk_ranges = chunk_ranges
        self._firsts: list[int] = []  # each chunk's first start
        self._starts: list[list[int]] = []  # per chunk, ascending; chunks are never empty
        self._ends: list[list[int]] = []  # per chunk, the ends (exclusive) of those ranges
        self._range_count = 0
        self.page_count = 0

    def __len__(self) -> int:
        """Ranges held (after merging)."""
        return self._range_count

    # ---- positions: (chunk, index) ----------------------------------------------------
    def _locate(self, page: int) -> tuple[int, int]:
        """Position of the last range starting at or before `page`; (−1, −1) if none."""
        chunk = bisect_right(self._firsts, page) - 1
        if chunk < 0:
            return -1, -1
        return chunk, bisect_right(self._starts[chunk], page) - 1

    def _insert_after(self, chunk: int, index: int, start: int, end: int) -> None:
        if chunk < 0:
            if not self._starts:
                self._firsts.append(start)
                self._starts.append([start])
                self._ends.append([end])
                self._range_count += 1
                return
            chunk, index = 0, -1
            self._firsts[0] = start
        starts, ends = self._starts[chunk], self._ends[chunk]
        starts.insert(index + 1, start)
        ends.insert(index + 1, end)
        self._range_count += 1
        half = self._chunk_ranges
        if len(starts) > 2 * half:
            self._starts[chunk:chunk + 1] = [starts[:half], starts[half:]]
            self._ends[chunk:chunk + 1] = [ends[:half], ends[half:]]
            self._firsts.insert(chunk + 1, starts[half])

    def _delete(self, chunk: int, index: int) -> bool:
        """Delete the range at a position; True if its chunk went with it."""
        starts, ends = self._starts[chunk], self._ends[chunk]
        del starts[index], ends[index]
        self._range_count -= 1
        if not starts:
            del self._starts[chunk], self._ends[chunk], self._firsts[chunk]
            return True
        if index == 0:
            self._firsts[chunk] = starts[0]
        return False

    def _set_start(self, chunk: int, index: int, start: int) -> None:
        self._starts[chunk][index] = start
        if index == 0:
            self._firsts[chunk] = start

    # ---- queries ----------------------------------------------------------------------
    def probe(self, start: int, end: int) -> Probe:
        """Where [start, end) would go: its neighbours' positions, the end of the range before
        it and the start of the range after it (one lookup, reused by `add_at`)."""
        chunk = bisect_right(self._firsts, start) - 1
        if chunk < 0:
            index, before_end, next_chunk, next_index = -1, -1, 0, 0
        else:
            starts = self._starts[chunk]
            index = bisect_right(starts, start) - 1
            before_end = self._ends[chunk][index]
            if index + 1 < len(starts):
                next_chunk, next_index = chunk, index + 1
            else:
                next_chunk, next_index = chunk + 1, 0
        after_start = self._starts[next_chunk][next_index] if next_chunk < len(self._starts) else _NO_PAGE
        return chunk, index, before_end, next_chunk, next_index, after_start

    @staticmethod
    def probe_overlaps(probe: Probe, start: int, end: int) -> bool:
        return probe[2] > start or probe[5] < end

    @staticmethod
    def probe_ranges_added(probe: Probe, start: int, end: int) -> int:
        """How the range count changes if [start, end) (not overlapping) is added: +1, 0 or −1."""
        return 1 - (probe[2] == start) - (probe[5] == end)

    def overlaps(self, start: int, end: int) -> bool:
        return self.probe_overlaps(self.probe(start, end), start, end)

    def contains(self, start: int, end: int) -> bool:
        """All of [start, end) held (by one range: held ranges are merged)."""
        chunk, index = self._locate(start)
        return chunk >= 0 and self._ends[chunk][index] >= end

    def covered(self, start: int, end: int) -> int:
        """Pages of [start, end) held."""
        chunk, index = self._locate(start)
        if chunk < 0:
            chunk, index = 0, 0
        total = 0
        while chunk < len(self._starts):
            starts, ends = self._starts[chunk], self._ends[chunk]
            while index < len(starts):
                if starts[index] >= end:
                    return total
                total += max(0, min(end, ends[index]) - max(start, starts[index]))
                index += 1
            chunk, index = chunk + 1, 0
        return total

    def splits(self, start: int, end: int) -> bool:
        """Removing [start, end) would cut one range in two (the only way a removal adds a range)."""
        chunk, index = self._locate(start)
        return chunk >= 0 and self._starts[chunk][index] < start and self._ends[chunk][index] > end

    def ranges_added_by(self, start: int, end: int) -> int:
        """How the range count changes if [start, end) (not overlapping) is added: +1, 0 or −1."""
        return self.probe_ranges_added(self.probe(start, end), start, end)

    # ---- updates ----------------------------------------------------------------------
    def add(self, start: int, end: int) -> None:
        """Add a range that does not overlap (callers check first); merges neighbours."""
        self.add_at(self.probe(start, end), start, end)

    def add_at(self, probe: Probe, start: int, end: int) -> None:
        """`add` with the probe of [start, end), taken since the last change."""
        chunk, index, before_end, next_chunk, next_index, after_start = probe
        merge_left, merge_right = before_end == start, after_start == end
        if merge_left and merge_right:
            self._ends[chunk][index] = self._ends[next_chunk][next_index]
            self._delete(next_chunk, next_index)
        elif merge_left:
            self._ends[chunk][index] = end
        elif merge_right:
            self._set_start(next_chunk, next_index, start)
        else:
            self._insert_after(chunk, index, start, end)
        self.page_count += end - start

    def remove(self, start: int, end: int) -> int:
        """Remove whatever part of [start, end) is held; returns the pages removed."""
        return sum(e - s for s, e in self.remove_pieces(start, end))

    def remove_pieces(self, start: int, end: int) -> list[tuple[int, int]]:
        """Remove whatever part of [start, end) is held; returns the [start, end) pieces removed."""
        pieces: list[tuple[int, int]] = []
        chunk, index = self._locate(start)
        if chunk < 0:
            chunk, index = 0, 0
        while chunk < len(self._starts):
            starts, ends = self._starts[chunk], self._ends[chunk]
            if index >= len(starts):
                chunk, index = chunk + 1, 0
                continue
            s, e = starts[index], ends[index]
            if s >= end:
                break
            if e <= start:
                index += 1
                continue
            cut_start, cut_end = max(s, start), min(e, end)
            pieces.append((cut_start, cut_end))
            if s < cut_start:  # keeps its left part
                ends[index] = cut_start
                if cut_end < e:  # and its right part: a hole in one range, nothing after it
                    self._insert_after(chunk, index, cut_end, e)
                    break
                index += 1
            elif cut_end < e:  # keeps its right part: the last range touched
                self._set_start(chunk, index, cut_end)
                break
            elif self._delete(chunk, index):
                index = 0  # the chunk went: the next range is the next chunk's first
        self.page_count -= sum(e - s for s, e in pieces)
        return pieces

    def clear(self) -> list[tuple[int, int]]:
        """Empty the set; returns what it held as [start, end) pieces."""
        pieces = [(s, e) for starts, ends in zip(self._starts, self._ends, strict=True)
                  for s, e in zip(starts, ends, strict=True)]
        self._firsts, self._starts, self._ends = [], [], []
        self._range_count = self.page_count = 0
        return pieces

    def ranges(self) -> list[tuple[int, int]]:
        return [(s, e - s) for starts, ends in zip(self._starts, self._ends, strict=True)
                for s, e in zip(starts, ends, strict=True)]


class Ledger:
    """All vms' balloons.

    `max_pfn`: the host's page frames are 0 .. max_pfn − 1 (the kernel's max_pfn, one past the
    highest frame); a PFN lock range reaching beyond it is INVALID. None: any page number the
    protocol allows (below MAX_PAGE_NUMBER). VPNs are bounded by the protocol only.
    `max_ranges_per_vm`: a lock range that would take one vm's ledger past this many (merged)
    ranges is REFUSED, so a vm's ledger, and the work per range, stay bounded.
    `chunk_ranges`: RangeSet's chunk size (tests make it tiny to exercise chunk splits).
    """

    def __init__(self, max_pfn: int | None = None, max_ranges_per_vm: int = MAX_RANGES_PER_VM,
                 chunk_ranges: int = _CHUNK_RANGES) -> None:
        self.max_pfn = MAX_PAGE_NUMBER if max_pfn is None else max_pfn
        self.max_ranges_per_vm = max_ranges_per_vm
        self._chunk_ranges = chunk_ranges
        self._vms: dict[str, RangeSet] = {}
        self._pfn_vms: set[str] = set()
        self._pfn_index = RangeSet(chunk_ranges)  # the union of every PFN vm's ranges

    def register(self, vm_id: str, page_kind: str) -> None:
        """Known vms keep their ledger (a re-hello in the same host session), unless the page
        kind changed: VPNs read as PFNs (or the reverse) name other pages, so that ledger is
        dropped and the vm starts empty."""
        pfn = page_kind == "pfn"
        mine = self._vms.get(vm_id)
        if mine is not None and (vm_id in self._pfn_vms) != pfn:
            self.pop(vm_id)
            mine = None
        if mine is None:
            self._vms[vm_id] = RangeSet(self._chunk_ranges)
        if pfn:
            self._pfn_vms.add(vm_id)

    def pop(self, vm_id: str) -> int:
        """Forget a vm's balloon (reset, lost, bye). Returns the pages it held."""
        mine = self._vms.pop(vm_id, None)
        if mine is None:
            self._pfn_vms.discard(vm_id)
            return 0
        held = mine.page_count
        if vm_id in self._pfn_vms:
            self._pfn_vms.discard(vm_id)
            for start, end in mine.clear():
                self._pfn_index.remove(start, end)
        return held

    def held_pages(self, vm_id: str) -> int:
        ranges = self._vms.get(vm_id)
        return ranges.page_count if ranges else 0

    def held_ranges(self, vm_id: str) -> int:
        ranges = self._vms.get(vm_id)
        return len(ranges) if ranges else 0

    def lock(self, vm_id: str, pages: PageRanges, cap_pages: int, adopt: bool) -> tuple[RangeResult, ...]:
        mine = self._vms[vm_id]
        pfn = vm_id in self._pfn_vms
        index = self._pfn_index
        limit = self.max_pfn if pfn else MAX_PAGE_NUMBER
        max_ranges = self.max_ranges_per_vm
        results = []
        for start, count in pages.ranges:
            end = start + count
            if end > limit:
                results.append(RangeResult(start=start, count=count, status=RangeStatus.INVALID))
                continue
            probe = mine.probe(start, end)
            index_probe = index.probe(start, end) if pfn else None
            if mine.probe_overlaps(probe, start, end):
                if adopt and probe[2] >= end:  # the range before it covers it: all ours
                    status = RangeStatus.OK  # re-reported after a host restart
                else:
                    status = RangeStatus.DUPLICATE
            elif index_probe is not None and index.probe_overlaps(index_probe, start, end):  # another PFN vm's
                status = RangeStatus.DUPLICATE
            elif mine.page_count + count > cap_pages or (  # past the cap, or past the range limit
                    len(mine) >= max_ranges and len(mine) + mine.probe_ranges_added(probe, start, end) > max_ranges):
                status = RangeStatus.REFUSED
            else:
                mine.add_at(probe, start, end)
                if index_probe is not None:
                    index.add_at(index_probe, start, end)
                status = RangeStatus.OK
            results.append(RangeResult(start=start, count=count, status=status))
        return tuple(results)

    def unlock(self, vm_id: str, pages: PageRanges) -> tuple[RangeResult, ...]:
        mine = self._vms[vm_id]
        pfn = vm_id in self._pfn_vms
        max_ranges = self.max_ranges_per_vm
        results = []
        for start, count in pages.ranges:
            if len(mine) >= max_ranges and mine.splits(start, start + count):
                # A hole in a held range adds a range: at the limit the host keeps the pages (the
                # agent keeps them pinned too), else unlocks of single pages from one large range
                # would grow the ledger without bound.
                results.append(RangeResult(start=start, count=count, status=RangeStatus.REFUSED))
                continue
            if pfn:
                pieces = mine.remove_pieces(start, start + count)
                for piece_start, piece_end in pieces:
                    self._pfn_index.remove(piece_start, piece_end)
                removed = sum(e - s for s, e in pieces)
            else:
                removed = mine.remove(start, start + count)
            status = RangeStatus.OK if removed == count else RangeStatus.UNKNOWN
            results.append(RangeResult(start=start, count=count, status=status))
        return tuple(results)
