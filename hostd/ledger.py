"""The page ledger: which page numbers each vm's balloon holds, as disjoint sorted ranges.

Answers lock/unlock per range, as vmw_balloon's host answers per entry: a lock range that
overlaps what the vm already holds is DUPLICATE (OK when re-adopted after a host restart);
one that would take the balloon past its cap is REFUSED; an unlock of pages the vm does not
hold is UNKNOWN (whatever part it did hold is removed). Pure: no I/O.

PFNs are machine-wide, so for PFN vms a range held by another vm is DUPLICATE too. VPNs are
per-process addresses: two agents may use the same numbers, so VPN vms are never compared.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

from protocol import PageRanges, RangeResult, RangeStatus


class RangeSet:
    """Disjoint, sorted, merged [start, end) ranges."""

    __slots__ = ("_ends", "_starts", "page_count")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self.page_count = 0

    def overlaps(self, start: int, end: int) -> bool:
        index = bisect_right(self._starts, start) - 1
        if index >= 0 and self._ends[index] > start:
            return True
        nxt = index + 1
        return nxt < len(self._starts) and self._starts[nxt] < end

    def covered(self, start: int, end: int) -> int:
        """Pages of [start, end) held."""
        total = 0
        index = max(0, bisect_right(self._starts, start) - 1)
        while index < len(self._starts) and self._starts[index] < end:
            total += max(0, min(end, self._ends[index]) - max(start, self._starts[index]))
            index += 1
        return total

    def add(self, start: int, end: int) -> None:
        """Add a range that does not overlap (callers check first); merges neighbours."""
        index = bisect_left(self._starts, start)
        merge_left = index > 0 and self._ends[index - 1] == start
        merge_right = index < len(self._starts) and self._starts[index] == end
        if merge_left and merge_right:
            self._ends[index - 1] = self._ends[index]
            del self._starts[index], self._ends[index]
        elif merge_left:
            self._ends[index - 1] = end
        elif merge_right:
            self._starts[index] = start
        else:
            self._starts.insert(index, start)
            self._ends.insert(index, end)
        self.page_count += end - start

    def remove(self, start: int, end: int) -> int:
        """Remove whatever part of [start, end) is held; returns the pages removed."""
        removed = 0
        index = max(0, bisect_right(self._starts, start) - 1)
        while index < len(self._starts) and self._starts[index] < end:
            s, e = self._starts[index], self._ends[index]
            if e <= start:
                index += 1
                continue
            cut_start, cut_end = max(s, start), min(e, end)
            removed += cut_end - cut_start
            pieces = [(a, b) for a, b in ((s, cut_start), (cut_end, e)) if b > a]
            self._starts[index:index + 1] = [a for a, _ in pieces]
            self._ends[index:index + 1] = [b for _, b in pieces]
            index += len(pieces)
        self.page_count -= removed
        return removed

    def ranges(self) -> list[tuple[int, int]]:
        return [(s, e - s) for s, e in zip(self._starts, self._ends, strict=True)]


class Ledger:
    """All vms' balloons."""

    def __init__(self) -> None:
        self._vms: dict[str, RangeSet] = {}
        self._pfn_vms: set[str] = set()

    def register(self, vm_id: str, page_kind: str) -> None:
        self._vms.setdefault(vm_id, RangeSet())
        if page_kind == "pfn":
            self._pfn_vms.add(vm_id)
        else:
            self._pfn_vms.discard(vm_id)

    def pop(self, vm_id: str) -> int:
        """Forget a vm's balloon (reset, lost, bye). Returns the pages it held."""
        held = self._vms.pop(vm_id, RangeSet()).page_count
        self._pfn_vms.discard(vm_id)
        return held

    def held_pages(self, vm_id: str) -> int:
        ranges = self._vms.get(vm_id)
        return ranges.page_count if ranges else 0

    def lock(self, vm_id: str, pages: PageRanges, cap_pages: int, adopt: bool) -> tuple[RangeResult, ...]:
        mine = self._vms[vm_id]
        others = [self._vms[v] for v in self._pfn_vms if v != vm_id] if vm_id in self._pfn_vms else []
        results = []
        for start, count in pages.ranges:
            end = start + count
            if mine.overlaps(start, end):
                if adopt and mine.covered(start, end) == count:
                    status = RangeStatus.OK  # re-reported after a host restart: already ours
                else:
                    status = RangeStatus.DUPLICATE
            elif any(other.overlaps(start, end) for other in others):
                status = RangeStatus.DUPLICATE
            elif mine.page_count + count > cap_pages:
                status = RangeStatus.REFUSED
            else:
                mine.add(start, end)
                status = RangeStatus.OK
            results.append(RangeResult(start=start, count=count, status=status))
        return tuple(results)

    def unlock(self, vm_id: str, pages: PageRanges) -> tuple[RangeResult, ...]:
        mine = self._vms[vm_id]
        results = []
        for start, count in pages.ranges:
            removed = mine.remove(start, start + count)
            status = RangeStatus.OK if removed == count else RangeStatus.UNKNOWN
            results.append(RangeResult(start=start, count=count, status=status))
        return tuple(results)
