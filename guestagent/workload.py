"""balloon-workload: a working set of a given size, touched page by page, reporting what
ballooning costs it (touch throughput and latency) as JSON lines on stdout.

    balloon-workload --size 400MiB                      touch 400 MiB over and over
    balloon-workload --size 400MiB --idle               touch it once, then hold it idle
    balloon-workload --size 100MiB --grow-to 600MiB --grow-rate 50MiB   grow each second

SIGUSR1 makes an idle workload touch its whole set once more (and report it): a test can
then see the major faults of pages that were pushed to swap.
"""

from __future__ import annotations

import argparse
import json
import mmap
import signal
import sys
import time
from collections.abc import Sequence

from protocol.units import parse_duration_ms, parse_size_bytes

PAGE = 4096


def _percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


class WorkingSet:
    def __init__(self, capacity_bytes: int) -> None:
        self.memory = mmap.mmap(-1, capacity_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.size_bytes = 0
        self.cursor = 0

    def grow_to(self, size_bytes: int) -> None:
        size_bytes = min(size_bytes, len(self.memory))
        for offset in range(self.size_bytes, size_bytes, PAGE):
            self.memory[offset] = 1
        self.size_bytes = max(self.size_bytes, size_bytes)

    def touch(self, pages: int, latencies_ms: list[float]) -> None:
        """Touch `pages` pages round-robin, timing chunks of 64 pages."""
        memory = self.memory
        for _ in range(0, pages, 64):
            started = time.perf_counter()
            for _ in range(64):
                memory[self.cursor] = (memory[self.cursor] + 1) & 0xFF
                self.cursor = (self.cursor + PAGE) % max(self.size_bytes, PAGE)
            latencies_ms.append((time.perf_counter() - started) * 1000 / 64)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="balloon-workload", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="256MiB", help="working set (default 256MiB)")
    parser.add_argument("--grow-to", help="grow the working set up to this size")
    parser.add_argument("--grow-rate", default="32MiB", help="growth per second (default 32MiB)")
    parser.add_argument("--idle", action="store_true", help="touch the set once, then hold it")
    parser.add_argument("--report-interval", default="2s", help="report period (default 2s)")
    parser.add_argument("--duration", help="stop after this long (default: run until SIGTERM)")
    args = parser.parse_args(argv)
    try:
        size = parse_size_bytes(args.size)
        grow_to = parse_size_bytes(args.grow_to) if args.grow_to else size
        grow_rate = parse_size_bytes(args.grow_rate)
        report_ms = parse_duration_ms(args.report_interval)
        duration_ms = parse_duration_ms(args.duration) if args.duration else None
    except ValueError as exc:
        parser.error(str(exc))
    working_set = WorkingSet(max(size, grow_to))
    working_set.grow_to(size)
    retouch = {"requested": False}
    stop = {"requested": False}
    signal.signal(signal.SIGUSR1, lambda *_: retouch.update(requested=True))
    signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
    started = last_report = last_grow = time.monotonic()
    latencies: list[float] = []
    touched = 0
    print(json.dumps({"event": "ready", "size_bytes": working_set.size_bytes}), flush=True)
    while not stop["requested"]:
        now = time.monotonic()
        if duration_ms is not None and (now - started) * 1000 >= duration_ms:
            break
        if working_set.size_bytes < grow_to and now - last_grow >= 0.1:
            # Grow smoothly, a tenth of the per-second rate every 100 ms, as real programs do.
            step = max(PAGE, (grow_rate // 10) & ~(PAGE - 1))
            working_set.grow_to(min(grow_to, working_set.size_bytes + step))
            last_grow = now
        if retouch["requested"]:
            retouch["requested"] = False
            t0 = time.perf_counter()
            working_set.touch(working_set.size_bytes // PAGE, latencies)
            touched += working_set.size_bytes // PAGE
            print(json.dumps({"event": "retouched", "pages": working_set.size_bytes // PAGE,
                              "seconds": round(time.perf_counter() - t0, 3)}), flush=True)
        if args.idle:
            time.sleep(0.05)
        else:
            working_set.touch(4096, latencies)
            touched += 4096
        if (now - last_report) * 1000 >= report_ms:
            ordered = sorted(latencies)
            print(json.dumps({
                "event": "report", "size_bytes": working_set.size_bytes,
                "touches_per_s": round(touched / (now - last_report)),
                "latency_p50_us": round(_percentile(ordered, 0.5) * 1000, 2),
                "latency_p99_us": round(_percentile(ordered, 0.99) * 1000, 2),
            }), flush=True)
            latencies, touched, last_report = [], 0, now
    return 0


if __name__ == "__main__":
    sys.exit(main())
