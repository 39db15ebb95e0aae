"""Blind host swap (`vswap_mode = "blind"`): hostd chooses the guest's pages itself, as ESX's
host swapping does ("without any involvement by the guest operating system"; ESX selects
the pages to swap randomly), instead of lowering the cgroup's limit and letting the guest's
own kernel LRU choose (which is what the balloon does too).

How: every process in the guest's cgroup is listed, its mappings read from
/proc/PID/smaps and its resident pages from /proc/PID/pagemap; ranges of `range_pages`
resident pages are drawn uniformly at random (without replacement) from all of them until the
wanted amount is reached, and paged out with process_madvise(pidfd, ..., MADV_PAGEOUT) — the
kernel writes anonymous pages to swap (the cgroup's swap, charged to the guest) and drops
clean file pages. The caller (hostd/reclaim.py) then holds the cgroup's limit where the
usage now is, so the guest cannot fault every page back at once: what it faults back in, its
own LRU must make room for.

What the kernel allows (Linux ≥ 5.10; root: PTRACE_MODE_READ on the target and CAP_SYS_NICE):
- mlocked mappings (the balloon's pinned pages; VmFlags `lo`), VM_IO/VM_PFNMAP (`io`, `pf`)
  and hugetlb (`ht`) mappings are refused with EINVAL: they are left out here.
- pages mapped by more than one process (shared libraries' text, fork-shared memory, shared
  anonymous memory) are skipped by the kernel; pagemap's "exclusively mapped" bit (56) lets
  us leave them out before choosing, so the amount chosen is the amount that can go.
- file pages of a mapping are paged out only when the caller may write the file or owns it
  (can_do_file_pageout; root may): dirty ones are written back, clean ones dropped.
- page cache that no process maps (read()/write() files) is in no address space, so
  process_madvise cannot reach it at all: blind swap never takes a guest's unmapped cache,
  where the limit (and the balloon, through the guest's LRU) take it first.
- a page under writeback stays charged until the write completes (swap cache); the held
  limit makes the kernel free those, the already-unmapped chosen pages, first.

The choice is pure and seeded (`choose_ranges`); reading /proc and the syscall are the I/O.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from protocol.limits import PAGE_SIZE_BYTES

MADV_PAGEOUT = 21
SYS_PROCESS_MADVISE = 440  # the same number on every architecture (the unified syscall table)
UIO_MAXIOV = 1024
DEFAULT_RANGE_PAGES = 16  # 64 KiB: random at a grain a 256 MiB guest has 4096 of
REFUSED_FLAGS = frozenset({"lo", "io", "pf", "ht"})  # locked, I/O, PFN map, hugetlb: EINVAL
SPECIAL = frozenset({"[vsyscall]", "[vvar]", "[vdso]", "[vvar_vclock]", "[uprobes]"})
_PRESENT, _SWAPPED, _FILE, _EXCLUSIVE = 1 << 63, 1 << 62, 1 << 61, 1 << 56


class PageoutError(OSError):
    """process_madvise is missing or not permitted (kernel < 5.10, not root)."""


# ---- pure: mappings, resident runs, the random choice ------------------------------------------
@dataclass(frozen=True, slots=True)
class Vma:
    start: int
    end: int
    path: str
    rss_bytes: int
    flags: frozenset[str]

    def refusal(self) -> str | None:
        """Why MADV_PAGEOUT cannot apply to this mapping, or None if it can."""
        refused = self.flags & REFUSED_FLAGS
        if refused:
            return "locked" if "lo" in refused else f"VmFlags {' '.join(sorted(refused))}"
        if self.path in SPECIAL:
            return "special mapping"
        return None


def parse_smaps(text: str) -> list[Vma]:
    vmas: list[Vma] = []
    start = end = rss = 0
    path = ""
    open_vma = False
    for line in text.splitlines():
        head, _, rest = line.partition(" ")
        if "-" in head and not head.endswith(":"):
            low, _, high = head.partition("-")
            try:
                start, end = int(low, 16), int(high, 16)
            except ValueError:
                continue
            parts = rest.split(None, 4)
            path = parts[4].strip() if len(parts) == 5 else ""
            rss, open_vma = 0, True
        elif head == "Rss:" and open_vma:
            rss = int(rest.split()[0]) * 1024
        elif head == "VmFlags:" and open_vma:
            vmas.append(Vma(start, end, path, rss, frozenset(rest.split())))
            open_vma = False
    return vmas


@dataclass(frozen=True, slots=True)
class Run:
    """Resident, exclusively mapped pages [address, address + pages·4 KiB) of one process."""

    pid: int
    address: int
    pages: int
    file: bool = False  # file-backed (or shared anonymous) pages; else private anonymous


def resident_runs(pid: int, vma_start: int, entries: np.ndarray, file_mapping: bool) -> list[Run]:
    """Runs of pages present and mapped by this process alone, from its pagemap entries
    (one uint64 per page from vma_start)."""
    wanted = ((entries & np.uint64(_PRESENT)) != 0) & ((entries & np.uint64(_EXCLUSIVE)) != 0)
    if not wanted.any():
        return []
    edges = np.flatnonzero(np.diff(np.concatenate(([0], wanted.view(np.int8), [0]))))
    return [Run(pid, vma_start + int(a) * PAGE_SIZE_BYTES, int(b - a), file_mapping)
            for a, b in zip(edges[::2], edges[1::2], strict=True)]


def choose_ranges(runs: Sequence[Run], want_pages: int, range_pages: int, rng: random.Random) -> list[Run]:
    """Ranges of at most `range_pages` pages (aligned to range_pages in the address space),
    drawn uniformly without replacement from the resident runs until `want_pages` are chosen
    (the last one trimmed). Every resident page is equally likely to be chosen, whatever
    its recency: blind. Returned sorted, adjacent ranges merged."""
    if want_pages <= 0 or range_pages <= 0:
        return []
    chunks: list[Run] = []
    grain = range_pages * PAGE_SIZE_BYTES
    for run in runs:
        address, end = run.address, run.address + run.pages * PAGE_SIZE_BYTES
        while address < end:
            stop = min(end, (address // grain + 1) * grain)
            chunks.append(Run(run.pid, address, (stop - address) // PAGE_SIZE_BYTES, run.file))
            address = stop
    order = list(range(len(chunks)))
    rng.shuffle(order)
    chosen: list[Run] = []
    total = 0
    for index in order:
        if total >= want_pages:
            break
        chunk = chunks[index]
        take = min(chunk.pages, want_pages - total)
        chosen.append(Run(chunk.pid, chunk.address, take, chunk.file))
        total += take
    return merge(chosen)


def merge(ranges: Iterable[Run]) -> list[Run]:
    merged: list[Run] = []
    for r in sorted(ranges, key=lambda r: (r.pid, r.address)):
        last = merged[-1] if merged else None
        if last is not None and last.pid == r.pid and last.file == r.file and \
                last.address + last.pages * PAGE_SIZE_BYTES == r.address:
            merged[-1] = Run(r.pid, last.address, last.pages + r.pages, r.file)
        else:
            merged.append(r)
    return merged


# ---- I/O: reading a process, the syscall -------------------------------------------------------
def process_runs(pid: int, proc: Path = Path("/proc")) -> tuple[list[Run], dict[str, int]]:
    """The process's resident exclusive runs, and the resident bytes left out by reason."""
    skipped: dict[str, int] = {}
    runs: list[Run] = []
    try:
        vmas = parse_smaps((proc / str(pid) / "smaps").read_text())
        pagemap = os.open(proc / str(pid) / "pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return [], {}
    try:
        for vma in vmas:
            if vma.rss_bytes == 0:
                continue
            why = vma.refusal()
            if why is not None:
                skipped[why] = skipped.get(why, 0) + vma.rss_bytes
                continue
            pages = (vma.end - vma.start) // PAGE_SIZE_BYTES
            try:
                data = os.pread(pagemap, pages * 8, vma.start // PAGE_SIZE_BYTES * 8)
            except OSError:
                continue
            entries = np.frombuffer(data[: len(data) // 8 * 8], dtype=np.uint64)
            found = resident_runs(pid, vma.start, entries, bool(vma.path) and not vma.path.startswith("["))
            exclusive = sum(r.pages for r in found) * PAGE_SIZE_BYTES
            if vma.rss_bytes > exclusive:
                skipped["shared"] = skipped.get("shared", 0) + vma.rss_bytes - exclusive
            runs.extend(found)
    finally:
        os.close(pagemap)
    return runs, skipped


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _process_madvise(pidfd: int, ranges: Sequence[Run]) -> int:
    """Bytes advised (process_madvise stops at the first range it cannot advise)."""
    vector = (_Iovec * len(ranges))(*[_Iovec(r.address, r.pages * PAGE_SIZE_BYTES) for r in ranges])
    result = _libc.syscall(SYS_PROCESS_MADVISE, pidfd, vector, len(ranges), MADV_PAGEOUT, 0)
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return int(result)


def advise(pid: int, ranges: Sequence[Run]) -> tuple[int, int]:
    """Page out `ranges` of `pid`: (bytes advised, ranges refused). A range the process has
    unmapped or locked since it was read is skipped, not an error."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return 0, len(ranges)
    advised = refused = 0
    try:
        index = 0
        while index < len(ranges):
            batch = ranges[index:index + UIO_MAXIOV]
            try:
                done = _process_madvise(pidfd, batch)
            except OSError as exc:
                if exc.errno in (errno.ENOSYS, errno.EPERM):
                    raise PageoutError(exc.errno, f"process_madvise(MADV_PAGEOUT): {exc.strerror} "
                                       "(needs Linux ≥ 5.10 and root)") from None
                if exc.errno == errno.ESRCH:
                    return advised, refused + len(ranges) - index
                done = 0  # the first range is refused (EINVAL: locked; ENOMEM: unmapped): skip it
            advised += done
            consumed = 0
            for r in batch:  # the ranges wholly advised, then the one it stopped at
                if done < r.pages * PAGE_SIZE_BYTES:
                    break
                done -= r.pages * PAGE_SIZE_BYTES
                consumed += 1
            if consumed < len(batch):
                refused += 1
                consumed += 1
            index += consumed
    finally:
        os.close(pidfd)
    return advised, refused


@dataclass(slots=True)
class PageoutResult:
    wanted_pages: int
    resident_pages: int = 0  # what could have been chosen (exclusive, resident, allowed)
    chosen_pages: int = 0
    anon_pages: int = 0
    file_pages: int = 0
    advised_bytes: int = 0
    refused_ranges: int = 0
    skipped_bytes: dict[str, int] = field(default_factory=dict)  # resident but left out, by reason
    ranges: list[Run] = field(default_factory=list)

    def describe(self) -> str:
        skipped = ", ".join(f"{why} {b >> 20} MiB" for why, b in sorted(self.skipped_bytes.items()) if b >> 20)
        return (f"blind pageout: {self.chosen_pages} of {self.wanted_pages} pages wanted chosen at random from "
                f"{self.resident_pages} resident ({self.anon_pages} anon, {self.file_pages} file), "
                f"{self.advised_bytes >> 20} MiB advised, {self.refused_ranges} ranges refused"
                + (f"; left out: {skipped}" if skipped else ""))


def page_out(pids: Sequence[int], want_bytes: int, rng: random.Random | None = None,
             range_pages: int = DEFAULT_RANGE_PAGES,
             runs_of: Callable[[int], tuple[list[Run], dict[str, int]]] = process_runs) -> PageoutResult:
    """Page out `want_bytes` of the processes' resident memory, chosen at random."""
    rng = rng or random.Random()
    result = PageoutResult(want_bytes // PAGE_SIZE_BYTES)
    runs: list[Run] = []
    for pid in pids:
        found, skipped = runs_of(pid)
        runs.extend(found)
        for why, amount in skipped.items():
            result.skipped_bytes[why] = result.skipped_bytes.get(why, 0) + amount
    result.resident_pages = sum(r.pages for r in runs)
    result.ranges = choose_ranges(runs, result.wanted_pages, range_pages, rng)
    result.chosen_pages = sum(r.pages for r in result.ranges)
    result.file_pages = sum(r.pages for r in result.ranges if r.file)
    result.anon_pages = result.chosen_pages - result.file_pages
    by_pid: dict[int, list[Run]] = {}
    for r in result.ranges:
        by_pid.setdefault(r.pid, []).append(r)
    for pid, ranges in by_pid.items():
        advised, refused = advise(pid, ranges)
        result.advised_bytes += advised
        result.refused_ranges += refused
    return result


__all__ = ["PageoutError", "PageoutResult", "Run", "Vma", "choose_ranges", "page_out", "parse_smaps",
           "process_runs", "resident_runs"]
