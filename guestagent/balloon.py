"""The pinning engine: the balloon's memory, really pinned.

One virtual region the size of the guest's memory is reserved at start (MAP_NORESERVE: it
costs nothing until used). Inflating pins the next batch of it with mlock(2) — for a
private writable mapping mlock faults every page in for writing, so the pages are really
allocated and charged to the guest's cgroup (the "touch" happens in the kernel, which is
why inflation runs at raw mlock speed). Deflating munlocks the batch and drops its pages
with MADV_DONTNEED, so they go back to the guest at once.

Page numbers come from /proc/self/pagemap: real PFNs when the agent has CAP_SYS_ADMIN
(Linux ≥ 4.2 hides them otherwise), else virtual page numbers of the region.

The only module of the agent that calls mmap/mlock (through ctypes: the stdlib mmap module
has no mlock).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as errno_module
import logging
import os
import resource
from array import array
from pathlib import Path

from guestagent.errors import PinError
from guestagent.pinning import Batch, SlotBook
from protocol import PAGE_SIZE_BYTES, PageRanges

log = logging.getLogger(__name__)

_PROT_READ, _PROT_WRITE = 0x1, 0x2
_MAP_PRIVATE, _MAP_ANONYMOUS, _MAP_NORESERVE = 0x02, 0x20, 0x4000
_MADV_DONTNEED, _MADV_HUGEPAGE = 4, 14
_MAP_FAILED = ctypes.c_void_p(-1).value
_HUGE_BYTES = 2 << 20
_CAP_IPC_LOCK_BIT = 14
_PFN_MASK = (1 << 55) - 1
_PRESENT_BIT = 1 << 63

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
for _name in ("munmap", "mlock", "munlock"):
    getattr(_libc, _name).argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def has_cap_ipc_lock(status_text: str) -> bool:
    """From /proc/self/status: is CAP_IPC_LOCK in the effective set?"""
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) & (1 << _CAP_IPC_LOCK_BIT))
    return False


def memlock_problem(requested_bytes: int) -> str | None:
    """None if mlock of `requested_bytes` is permitted, else a sentence saying how to fix it."""
    if has_cap_ipc_lock(Path("/proc/self/status").read_text()):
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY or soft >= requested_bytes:
        return None
    return (
        f"cannot pin {requested_bytes >> 20} MiB: no CAP_IPC_LOCK and RLIMIT_MEMLOCK is {soft >> 10} KiB. "
        "Give the container `cap_add: [IPC_LOCK]` (docker: --cap-add IPC_LOCK) or raise the memlock limit."
    )


def ranges_from_pagemap(entries: array[int]) -> PageRanges:
    """The frame numbers of pagemap entries as ranges, in one pass: consecutive frames have
    consecutive entries (the flag bits above the PFN are the same for pinned anonymous pages,
    and a PFN never carries into them), so runs are found on the raw entries and only their
    starts are masked. Runs come in allocator order (often descending blocks); `from_ranges`
    sorts and merges the few runs instead of sorting every page (issue 18: a third of the
    PFN path's per-batch cost)."""
    runs: list[tuple[int, int]] = []
    if not entries:
        return PageRanges(())
    start = previous = entries[0]
    for entry in entries[1:]:
        if entry != previous + 1:
            runs.append((start & _PFN_MASK, previous - start + 1))
            start = entry
        previous = entry
    runs.append((start & _PFN_MASK, previous - start + 1))
    return PageRanges.from_ranges(runs)


def thp_available(sysfs: Path = Path("/sys/kernel/mm/transparent_hugepage/enabled")) -> bool:
    try:
        return "[never]" not in sysfs.read_text()
    except OSError:
        return False


class MlockPinner(SlotBook):
    """Pins and releases batches of a reserved region. Not thread-safe (one agent loop).
    Implements `guestagent.pinning.Pinner`; the books (batches, holes, dropped) are the
    shared `SlotBook`, so `FakePinner` allocates exactly as this one does."""

    def __init__(self, capacity_pages: int, *, want_pfn: bool = True, huge_pages: bool = False) -> None:
        super().__init__(capacity_pages)
        length = capacity_pages * PAGE_SIZE_BYTES + _HUGE_BYTES
        address = _libc.mmap(None, length, _PROT_READ | _PROT_WRITE, _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE,
                             -1, 0)
        if address in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            raise PinError(err, length, f"cannot reserve {length >> 20} MiB of address space: {os.strerror(err)}")
        self._mapping = (address, length)
        self._base: int = (int(address) + _HUGE_BYTES - 1) & ~(_HUGE_BYTES - 1)  # 2 MiB aligned for THP
        self.huge_pages = huge_pages and thp_available()
        if self.huge_pages and _libc.madvise(self._base, capacity_pages * PAGE_SIZE_BYTES, _MADV_HUGEPAGE):
            log.warning("MADV_HUGEPAGE refused (%s): pinning 4 KiB pages", os.strerror(ctypes.get_errno()))
            self.huge_pages = False
        self._pagemap_fd = os.open("/proc/self/pagemap", os.O_RDONLY)
        self.page_kind = "pfn" if want_pfn and self._probe_pfn() else "vpn"

    # ---- page numbers ----------------------------------------------------------------
    def _vpn(self, offset_pages: int) -> int:
        return (self._base >> 12) + offset_pages

    def _read_pfns(self, first_vpn: int, count: int) -> array[int]:
        entries = array("Q")
        entries.frombytes(os.pread(self._pagemap_fd, 8 * count, 8 * first_vpn))
        return entries

    def _probe_pfn(self) -> bool:
        """Pin one page and see whether pagemap shows its frame number (needs CAP_SYS_ADMIN)."""
        if _libc.mlock(self._base, PAGE_SIZE_BYTES):
            return False
        try:
            entry = self._read_pfns(self._vpn(0), 1)[0]
            return bool(entry & _PRESENT_BIT) and (entry & _PFN_MASK) != 0
        finally:
            self._unpin_memory(0, 1)

    def _page_numbers(self, offset_pages: int, count: int) -> PageRanges:
        first = self._vpn(offset_pages)
        if self.page_kind == "vpn":
            return PageRanges(((first, count),))
        return ranges_from_pagemap(self._read_pfns(first, count))

    # ---- pin / release ---------------------------------------------------------------
    def pin(self, page_count: int) -> Batch:
        """Pin `page_count` more pages as one batch. On failure nothing stays pinned."""
        return self.pin_batches(page_count, page_count)[0]

    def pin_batches(self, page_count: int, batch_pages: int) -> list[Batch]:
        """Pin `page_count` more pages with one mlock(2), as batches of at most `batch_pages`
        (each batch is one lock message and one unit of release). One call per several
        batches: each mlock of a sub-range splits and re-merges the region's VMA, and the
        agent's loop overhead is paid per call, not per batch. On failure nothing stays pinned."""
        if page_count < 1 or batch_pages < 1:
            raise PinError(errno_module.EINVAL, 0, "pin needs at least one page")
        offset = self._take_slot(page_count)
        address = self._base + offset * PAGE_SIZE_BYTES
        length = page_count * PAGE_SIZE_BYTES
        if _libc.mlock(address, length):
            err = ctypes.get_errno()
            self._unpin_memory(offset, page_count)
            self._return_slot(offset, page_count)
            hint = memlock_problem(length) if err in (errno_module.EPERM, errno_module.ENOMEM) else None
            raise PinError(err, length, hint or f"mlock of {length >> 10} KiB failed: {os.strerror(err)}")
        return self._record(offset, page_count, batch_pages)

    def _unpin_memory(self, offset_pages: int, page_count: int) -> None:
        """munlock + MADV_DONTNEED: the pages' memory goes back to the kernel now, not when
        it next needs some (the address range stays mapped for the next pin)."""
        address = self._base + offset_pages * PAGE_SIZE_BYTES
        length = page_count * PAGE_SIZE_BYTES
        _libc.munlock(address, length)
        _libc.madvise(address, length, _MADV_DONTNEED)

    def release(self, batch: Batch) -> None:
        """Unpin a batch and give its pages back to the guest at once."""
        self._forget(batch)
        self._unpin_memory(batch.offset_pages, batch.page_count)
        self._held_pages -= batch.page_count
        self._return_slot(batch.offset_pages, batch.page_count)

    def drop_backing(self, batch: Batch) -> None:
        """Reclaim mode: the host has the batch's page numbers in its ledger and will lower the
        guest's limit by them, so the memory itself goes back now (munlock + MADV_DONTNEED):
        the balloon keeps the pages in its count, the host gets the RAM."""
        if self._mark_dropped(batch):
            self._unpin_memory(batch.offset_pages, batch.page_count)

    def close(self) -> None:
        self.release_all()
        address, length = self._mapping
        _libc.munmap(address, length)
        os.close(self._pagemap_fd)


# The name callers used before the `Pinner` protocol (guestagent.pinning) existed.
Pinner = MlockPinner
