"""hostd's heap trim after connection churn (hostd/heap_trim.py): when the schedule trims, and
that glibc's malloc_trim really returns a fragmented heap's free pages (in a fresh interpreter:
the heap is process-wide)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hostd.heap_trim import HeapTrimSchedule, connection_churn

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("ticks", "due_at"), [
    # (ms, churn) per tick → the ticks at which a trim is due (and then done)
    ([(0, 0), (100, 0), (10_000, 0)], []),  # no churn: never (a steady host never pays)
    ([(0, 50), (100, 100), (200, 150)], [100]),  # a burst of 100 since the last trim: at once
    ([(0, 100), (100, 300), (1_000, 500), (2_000, 700)], [0, 2_000]),  # bursts: at most every 2 s
    ([(0, 10), (4_900, 10), (5_000, 10)], [5_000]),  # a little churn: once it was quiet for 5 s
    ([(0, 10), (3_000, 20), (7_900, 20), (8_000, 20), (20_000, 20)], [8_000]),  # quiet from its last change
    ([(0, 100), (5_000, 100), (10_000, 100)], [0]),  # nothing new since the trim: not again
])
def test_when_the_heap_is_trimmed(ticks, due_at):
    schedule = HeapTrimSchedule()
    trimmed = []
    for now_ms, churn in ticks:
        if schedule.due(now_ms, churn):
            schedule.trimmed(now_ms, churn)
            trimmed.append(now_ms)
    assert trimmed == due_at


def test_churn_counts_refusals_and_departures_only():
    assert connection_churn({"MALFORMED": 3, "LIMIT_EXCEEDED": 2}, {"agents_lost": 4, "agents_left": 1,
                                                                   "resets": 99, "blocks": 7}) == 10
    assert connection_churn({}, {}) == 0


# Fragments 64 MiB of 1 KiB blocks with one block in 16 kept (so glibc's own trim of the
# heap's top cannot return it), then trims: RSS in MiB before and after.
PROBE = r"""
import ctypes
from hostd.heap_trim import trim_heap
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
blocks = [libc.malloc(1024) for _ in range(65536)]
for block in blocks:
    ctypes.memset(block, 1, 1024)
for index, block in enumerate(blocks):
    if index % 16:
        libc.free(block)
before = rss_mib()
returned = trim_heap()
print(returned, round(before, 1), round(rss_mib(), 1))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"),
                    reason="glibc's malloc_trim")
def test_a_trim_returns_the_free_pages_of_a_fragmented_heap():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    returned, before, after = result.stdout.split()
    # 60 MiB freed in 15 KiB runs between live blocks: their whole free pages go back
    assert returned == "True" and float(before) - float(after) >= 24, result.stdout
