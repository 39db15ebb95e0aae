"""Inflate throughput and reaction time of the guest agent (root: makes a memory cgroup).

    python -m bench agent_bench

1. raw mmap+mlock of 1 GiB vs the Pinner (512-page batches, VPN and PFN page numbers),
   alternating, after a warm-up (the host backs our memory lazily: the first touch of a
   range is much slower than later ones, so unwarmed numbers compare the host, not us).
2. pagemap read time for 1 GiB (262,144 entries).
3. The whole agent in a cgroup, through real ZeroMQ: set_target(1 GiB) → balloon at target,
   and set_target → first lock frame latency over 200 small target changes.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

ONE_GIB = 1 << 30
PAGES = ONE_GIB // 4096


def raw_mlock_seconds() -> float:
    from guestagent.balloon import _libc

    address = _libc.mmap(None, ONE_GIB, 0x3, 0x22 | 0x4000, -1, 0)
    started = time.perf_counter()
    if _libc.mlock(address, ONE_GIB):
        raise SystemExit("mlock failed: run as root or with CAP_IPC_LOCK")
    elapsed = time.perf_counter() - started
    _libc.munmap(address, ONE_GIB)
    return elapsed


def pinner_seconds(want_pfn: bool) -> tuple[float, str]:
    from guestagent.balloon import Pinner

    pinner = Pinner(PAGES, want_pfn=want_pfn)
    started = time.perf_counter()
    while pinner.held_pages < PAGES:
        pinner.pin(512)
    elapsed = time.perf_counter() - started
    kind = pinner.page_kind
    pinner.close()
    return elapsed, kind


def pagemap_seconds() -> float:
    from guestagent.balloon import Pinner

    pinner = Pinner(PAGES, want_pfn=True)
    pinner.pin(PAGES)
    started = time.perf_counter()
    pinner._read_pfns(pinner._vpn(0), PAGES)
    elapsed = time.perf_counter() - started
    pinner.close()
    return elapsed


RAW_IN_CGROUP = (
    "import time, ctypes, ctypes.util\n"
    "libc = ctypes.CDLL(ctypes.util.find_library('c'), use_errno=True)\n"
    "libc.mmap.restype = ctypes.c_void_p\n"
    "libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]\n"
    "libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]\n"
    "a = libc.mmap(None, 1 << 30, 3, 0x22 | 0x4000, -1, 0)\n"
    "t = time.perf_counter(); assert libc.mlock(a, 1 << 30) == 0; print(time.perf_counter() - t)\n"
)


def agent_end_to_end(rounds: int = 5) -> tuple[list[float], list[float], list[float]]:
    """In one cgroup, alternately: a raw mmap+mlock of 1 GiB (timed inside that process) and the
    agent inflating 1 GiB (set_target → the host's ledger holds every page), then deflating."""
    import zmq

    from tests.integration.cgroups import TestCgroup
    from tests.integration.minihost import MiniHost

    context = zmq.Context()
    host = MiniHost(context, report_interval_ms=100)
    cgroup = TestCgroup(3 * ONE_GIB, ONE_GIB)
    raw_s: list[float] = []
    agent_s: list[float] = []
    latencies_ms: list[float] = []
    try:
        def raw_once() -> float:
            out = cgroup.python("-c", RAW_IN_CGROUP, stdout=subprocess.PIPE)
            seconds = float(out.communicate(timeout=60)[0])
            return seconds

        raw_once()  # warm-up: the host backs this memory once
        cgroup.python("-m", "guestagent", "--vm-id", "bench", "--host-endpoint", host.endpoint,
                      "--cgroup-path", str(cgroup.path), "--report-interval", "100ms", "--log-level", "WARNING",
                      "--want-pfn", "false", stderr=subprocess.DEVNULL)
        host.pump(lambda: host.hellos, 10, "hello")
        for _ in range(rounds):
            raw_s.append(raw_once())
            started = time.perf_counter()
            host.set_target("bench", PAGES)
            host.pump(lambda: len(host.ledger[b"bench"]) == PAGES, 60, "1 GiB in the ledger")
            agent_s.append(time.perf_counter() - started)
            host.set_target("bench", 0)
            host.pump(lambda: not host.ledger[b"bench"] and host.last_status().balloon_pages == 0, 60, "deflated")
        host.set_target("bench", PAGES // 2)
        host.pump(lambda: len(host.ledger[b"bench"]) == PAGES // 2, 60, "512 MiB")
        for index in range(200):
            target = PAGES // 2 - 512 * (1 + index % 2)  # alternate: deflate one batch, inflate it back
            frames_before = host.lock_frames
            unlocked_before = len(host.ledger[b"bench"])
            host.set_target("bench", target)
            sent = host.target_sent_at[host.target_seq]
            def moved(f: int = frames_before, u: int = unlocked_before) -> bool:
                return host.lock_frames != f or len(host.ledger[b"bench"]) != u

            host.pump(moved, 5, "movement")
            latencies_ms.append((time.perf_counter() - sent) * 1000)
            host.pump(lambda t=target: len(host.ledger[b"bench"]) == t, 5, "settle")
        return raw_s, agent_s, latencies_ms
    finally:
        cgroup.destroy()
        host.close()
        context.destroy(linger=0)


def main() -> None:
    if os.geteuid() != 0:
        print("agent_bench: needs root (memory cgroup, mlock of 1 GiB)", file=sys.stderr)
        return
    raw_mlock_seconds()  # warm-up: let the host back this much memory once
    raw, vpn, pfn = [], [], []
    for _ in range(3):
        raw.append(raw_mlock_seconds())
        vpn.append(pinner_seconds(False)[0])
        raw.append(raw_mlock_seconds())
        pfn.append(pinner_seconds(True)[0])
    raw_median = statistics.median(raw)
    print("agent: pin 1 GiB (median of 3, alternating with raw mmap+mlock)")
    print(f"{'method':<34}{'seconds':>9}{'GiB/s':>8}{'vs raw':>8}")
    for label, values in (("raw mmap+mlock (one call)", raw), ("Pinner, 512-page batches, VPN", vpn),
                          ("Pinner, 512-page batches, PFN", pfn)):
        median = statistics.median(values)
        print(f"{label:<34}{median:>9.3f}{1 / median:>8.2f}{raw_median / median:>8.2f}")
    print(f"pagemap read of 262,144 entries: {pagemap_seconds() * 1000:.1f} ms")
    raw_cg, agent_cg, latencies = agent_end_to_end()
    latencies.sort()
    raw_cg_median, agent_cg_median = statistics.median(raw_cg), statistics.median(agent_cg)
    print("whole agent in a 3 GiB cgroup, 1 GiB, alternating (median of 5):")
    print(f"  raw mmap+mlock in the cgroup {raw_cg_median:.3f} s; agent set_target → 1 GiB in the host ledger "
          f"{agent_cg_median:.3f} s; ratio {raw_cg_median / agent_cg_median:.2f}"
          f"  (raw {[round(x, 3) for x in raw_cg]}, agent {[round(x, 3) for x in agent_cg]})")
    print(f"set_target → first lock/unlock at the host, {len(latencies)} changes: "
          f"p50 {latencies[len(latencies) // 2]:.2f} ms, p99 {latencies[int(len(latencies) * 0.99) - 1]:.2f} ms, "
          f"max {latencies[-1]:.2f} ms (host clock: send → the first lock/unlock frame decoded)")
