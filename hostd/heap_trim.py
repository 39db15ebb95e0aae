"""Give the heap that churned connections freed back to the kernel (glibc's malloc_trim).

Each ZeroMQ connection costs libzmq ~48 KiB (pipe chunks, encode and decode buffers), allocated
in its I/O thread. When thousands of one-shot peers connect and leave (review-security S11:
20,000 identities), glibc keeps what they freed in its arenas, fragmented between the chunks
still in use, so hostd's RSS stayed +53..+105 MiB above its start after the flood although
every connection and vm record was gone (tracemalloc: +2.6 MiB of it Python's). `malloc_trim(0)`
returns every whole free page of every arena; measured 2026-12-01 (session 10): +4.4 MiB left
a few seconds after the flood, each trim 7–42 ms of the loop at load 4–5.

So hostd trims after churn, not on a clock: a steady host (thousands of agents reporting,
none coming or going) never pays for it. Churn is what hostd counts anyway: refused frames,
and agents lost or gone. `HeapTrimSchedule` is pure; `trim_heap` is the one call into libc.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from dataclasses import dataclass, field


def connection_churn(protocol_errors: Mapping[str, int], counters: Mapping[str, int]) -> int:
    """A running count of what frees connections' memory: refused frames, agents lost or gone."""
    return sum(protocol_errors.values()) + counters.get("agents_lost", 0) + counters.get("agents_left", 0)


def trim_heap() -> bool:
    """glibc's malloc_trim(0): True if it returned memory to the kernel, False if it had none
    to return or this libc has no such call (musl, macOS)."""
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim.argtypes = (ctypes.c_size_t,)
    malloc_trim.restype = ctypes.c_int
    return bool(malloc_trim(0))


@dataclass
class HeapTrimSchedule:
    """When to trim, from a running churn count (`due` every tick, `trimmed` after a trim).

    A burst (≥ `burst_churn` since the last trim) trims at most every `min_interval_ms`, so a
    flood is trimmed as it goes; any churn at all is trimmed once it has been quiet for
    `settle_ms`, so the tail of a flood (its last losses come a few reports after its last
    hello) is returned too.
    """

    burst_churn: int = 100
    min_interval_ms: int = 2_000
    settle_ms: int = 5_000
    # what the schedule has seen: not settings
    _trimmed_churn: int = field(default=0, init=False)
    _trimmed_ms: int | None = field(default=None, init=False)
    _seen_churn: int = field(default=0, init=False)
    _changed_ms: int = field(default=0, init=False)

    def due(self, now_ms: int, churn: int) -> bool:
        if churn != self._seen_churn:
            self._seen_churn, self._changed_ms = churn, now_ms
        pending = churn - self._trimmed_churn
        if pending <= 0 or (self._trimmed_ms is not None and now_ms - self._trimmed_ms < self.min_interval_ms):
            return False
        return pending >= self.burst_churn or now_ms - self._changed_ms >= self.settle_ms

    def trimmed(self, now_ms: int, churn: int) -> None:
        self._trimmed_churn, self._trimmed_ms = churn, now_ms
