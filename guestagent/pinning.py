"""What the agent's session needs of a balloon: the `Pinner` protocol, its `Batch`, and a
`FakePinner` that keeps the same books without touching memory.

`guestagent.balloon.MlockPinner` is the real one (mmap + mlock + pagemap; the only module of
the agent that pins memory). The session (`guestagent.session`) is written against the
protocol, so every decision it makes about pinning and releasing can be tested with the fake,
without root, RLIMIT_MEMLOCK or a cgroup.
"""

from __future__ import annotations

import errno as errno_module
from dataclasses import dataclass
from typing import Protocol

from guestagent.errors import PinError
from protocol import PAGE_SIZE_BYTES, PageRanges


@dataclass(frozen=True, slots=True)
class Batch:
    """A pinned run of the region: `offset_pages` into it, `page_count` long."""

    offset_pages: int
    page_count: int
    pages: PageRanges  # the page numbers reported to the host (PFN or VPN)


class Pinner(Protocol):
    """Pins and releases batches of a region `capacity_pages` long (one agent loop: not thread-safe)."""

    capacity_pages: int
    page_kind: str  # "pfn" | "vpn": what `Batch.pages` numbers
    huge_pages: bool

    @property
    def held_pages(self) -> int: ...

    @property
    def batches(self) -> tuple[Batch, ...]:
        """Pinned batches in address order (the last one is the newest at the top)."""
        ...

    @property
    def dropped_pages(self) -> int:
        """Balloon pages whose memory was handed back to the host (reclaim mode)."""
        ...

    def pin_batches(self, page_count: int, batch_pages: int) -> list[Batch]:
        """Pin `page_count` more pages as batches of at most `batch_pages`; on failure
        (PinError) nothing stays pinned."""
        ...

    def release(self, batch: Batch) -> None: ...

    def drop_backing(self, batch: Batch) -> None: ...

    def batches_from_top(self) -> list[Batch]: ...

    def holds(self, batch: Batch) -> bool: ...

    def release_last(self) -> Batch: ...

    def release_all(self) -> int: ...

    def renumber(self, skip_offsets: frozenset[int] = frozenset()) -> list[tuple[Batch, Batch]]:
        """Read the held batches' page numbers again (the kernel migrates mlocked pages, so a
        PFN can change under a pinned page); batches whose numbers changed get the new ones.
        Returns (old, new) of those. Batches at `skip_offsets` and dropped ones are not read."""
        ...


class SlotBook:
    """The books of a region: which offsets are pinned as which batches, the holes that
    released batches left below the top (first fit), and the batches whose memory went back
    to the host. Shared by the real pinner and the fake, so the fake allocates exactly as the
    real one does; subclasses supply the page numbers and the memory operations."""

    def __init__(self, capacity_pages: int) -> None:
        self.capacity_pages = capacity_pages
        self._batches: dict[int, Batch] = {}  # by offset_pages
        self._holes: list[tuple[int, int]] = []  # released (offset, count) below the top
        self._top_pages = 0
        self._held_pages = 0
        self._dropped: set[int] = set()  # offsets of batches whose memory went back to the host
        self._dropped_pages = 0

    @property
    def held_pages(self) -> int:
        return self._held_pages

    @property
    def batches(self) -> tuple[Batch, ...]:
        """Pinned batches in address order (the last one is the newest at the top)."""
        return tuple(self._batches[offset] for offset in sorted(self._batches))

    @property
    def dropped_pages(self) -> int:
        """Balloon pages whose memory was handed back to the host (reclaim mode)."""
        return self._dropped_pages

    def _take_slot(self, page_count: int) -> int:
        """First fit among the holes left by released batches, else the top of the region."""
        for index, (offset, count) in enumerate(self._holes):
            if count >= page_count:
                if count == page_count:
                    del self._holes[index]
                else:
                    self._holes[index] = (offset + page_count, count - page_count)
                return offset
        if self._top_pages + page_count > self.capacity_pages:
            raise PinError(errno_module.EINVAL, page_count * PAGE_SIZE_BYTES,
                           f"pin {page_count} pages: balloon capacity is {self.capacity_pages} pages")
        offset = self._top_pages
        self._top_pages += page_count
        return offset

    def _return_slot(self, offset: int, page_count: int) -> None:
        self._holes.append((offset, page_count))
        self._holes.sort()
        merged: list[tuple[int, int]] = []
        for start, count in self._holes:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + count)
            else:
                merged.append((start, count))
        if merged and merged[-1][0] + merged[-1][1] == self._top_pages:
            self._top_pages = merged.pop()[0]
        self._holes = merged

    def _record(self, offset: int, page_count: int, batch_pages: int) -> list[Batch]:
        batches = []
        for start in range(offset, offset + page_count, batch_pages):
            count = min(batch_pages, offset + page_count - start)
            batch = Batch(offset_pages=start, page_count=count, pages=self._page_numbers(start, count))
            self._batches[start] = batch
            batches.append(batch)
        self._held_pages += page_count
        return batches

    def _page_numbers(self, offset_pages: int, count: int) -> PageRanges:
        raise NotImplementedError

    def _forget(self, batch: Batch) -> None:
        """Take a pinned batch out of the books (the caller unpins its memory)."""
        if self._batches.get(batch.offset_pages) != batch:
            raise PinError(errno_module.EINVAL, 0, f"batch at page offset {batch.offset_pages} is not pinned")
        del self._batches[batch.offset_pages]
        if batch.offset_pages in self._dropped:
            self._dropped.discard(batch.offset_pages)
            self._dropped_pages -= batch.page_count

    def _mark_dropped(self, batch: Batch) -> bool:
        """Record a batch's memory as handed back; False if it is not pinned or already dropped."""
        if self._batches.get(batch.offset_pages) != batch or batch.offset_pages in self._dropped:
            return False
        self._dropped.add(batch.offset_pages)
        self._dropped_pages += batch.page_count
        return True

    def batches_from_top(self) -> list[Batch]:
        """Pinned batches, the newest at the top of the region first (deflate order)."""
        return [self._batches[offset] for offset in sorted(self._batches, reverse=True)]

    def holds(self, batch: Batch) -> bool:
        """This very pin is still held: a batch pinned again at the same offset (first fit) is
        another pin even where its page numbers are equal (freed frames come back first), and a
        reply about the old one must not act on it."""
        return self._batches.get(batch.offset_pages) is batch

    def release(self, batch: Batch) -> None:  # each pinner frees its memory its own way
        raise NotImplementedError

    def release_last(self) -> Batch:
        """Release the newest batch at the top of the region."""
        batch = self._batches[max(self._batches)]
        self.release(batch)
        return batch

    def release_all(self) -> int:
        released = self._held_pages
        for batch in list(self._batches.values()):
            self.release(batch)
        return released

    def renumber(self, skip_offsets: frozenset[int] = frozenset()) -> list[tuple[Batch, Batch]]:
        """Read the held batches' page numbers again (PFNs: compaction moves mlocked pages
        to other frames, compact_unevictable_allowed=1 by default, and the frames left behind
        are the next ones a pin gets); batches whose numbers changed are booked with the new
        ones. Returns (old, new) of those. Batches at `skip_offsets` (a lock in flight) and
        batches whose memory went back to the host are not read."""
        moved = []
        for offset in sorted(self._batches):
            batch = self._batches[offset]
            if offset in skip_offsets or offset in self._dropped:
                continue
            pages = self._page_numbers(offset, batch.page_count)
            if pages != batch.pages:
                new = Batch(offset_pages=offset, page_count=batch.page_count, pages=pages)
                self._batches[offset] = new
                moved.append((batch, new))
        return moved


class FakePinner(SlotBook):
    """The real pinner's books and page numbers (VPNs from `base_vpn`) without memory: every
    call is recorded in `calls`; `fail_next_pins` makes the next pins raise PinError (ENOMEM)."""

    def __init__(self, capacity_pages: int, *, base_vpn: int = 0x10_0000, huge_pages: bool = False) -> None:
        super().__init__(capacity_pages)
        self.page_kind = "vpn"
        self.huge_pages = huge_pages
        self.base_vpn = base_vpn
        self.calls: list[tuple[str, int]] = []  # ("pin", pages) | ("release", pages) | ("drop", pages)
        self.fail_next_pins = 0

    def _page_numbers(self, offset_pages: int, count: int) -> PageRanges:
        return PageRanges(((self.base_vpn + offset_pages, count),))

    def pin_batches(self, page_count: int, batch_pages: int) -> list[Batch]:
        if page_count < 1 or batch_pages < 1:
            raise PinError(errno_module.EINVAL, 0, "pin needs at least one page")
        if self.fail_next_pins:
            self.fail_next_pins -= 1
            raise PinError(errno_module.ENOMEM, page_count * PAGE_SIZE_BYTES, "fake: mlock refused")
        offset = self._take_slot(page_count)
        self.calls.append(("pin", page_count))
        return self._record(offset, page_count, batch_pages)

    def release(self, batch: Batch) -> None:
        self._forget(batch)
        self._held_pages -= batch.page_count
        self._return_slot(batch.offset_pages, batch.page_count)
        self.calls.append(("release", batch.page_count))

    def drop_backing(self, batch: Batch) -> None:
        if self._mark_dropped(batch):
            self.calls.append(("drop", batch.page_count))
