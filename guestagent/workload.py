"""balloon-workload: a working set touched page by page in phases, reporting what ballooning
costs it (touch throughput and latency percentiles) as JSON lines on stdout and, with
--report-file, to a file the guest's agent forwards to hostd.

    balloon-workload --size 400MiB                      touch 400 MiB over and over
    balloon-workload --size 400MiB --idle               touch it once, then hold it idle
    balloon-workload --size 100MiB --grow-to 600MiB --grow-rate 50MiB   grow each second
    balloon-workload --phases "active 300MiB for 60s, idle 120s, grow to 400MiB, repeat"

Phase spec: see guestagent/phases.py (active [SIZE] [for DURATION] [at N/s] | idle [DURATION]
| grow to SIZE [at SIZE/s], comma-separated, optionally ending in "repeat").

SIGUSR1 makes the workload touch its whole set once more (and report it): a test can then
see the major faults of pages that were pushed to swap. SIGTERM/SIGINT end it with exit 0.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from guestagent.phases import (
    DEFAULT_GROW_BYTES_PER_S,
    Phase,
    PhaseClock,
    PhasePlan,
    PhaseSpecError,
    advance,
    parse_phases,
)
from protocol.limits import PAGE_SIZE_BYTES
from protocol.units import parse_duration_ms, parse_size_bytes

TOUCH_CHUNK_PAGES = 64  # latency is timed per chunk: perf_counter per page would dominate


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


class WorkingSet:
    """One anonymous mapping of the largest size any phase needs; `size_bytes` of it in use."""

    def __init__(self, capacity_bytes: int) -> None:
        self.memory = mmap.mmap(-1, capacity_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.size_bytes = 0
        self.cursor = 0

    def resize(self, size_bytes: int) -> None:
        size_bytes = min(size_bytes, len(self.memory)) & ~(PAGE_SIZE_BYTES - 1)
        if size_bytes < self.size_bytes:
            # Give the tail back to the guest (MADV_DONTNEED zeroes it; a later grow re-touches).
            self.memory.madvise(mmap.MADV_DONTNEED, size_bytes, self.size_bytes - size_bytes)
            self.size_bytes = size_bytes
            self.cursor = 0
            return
        for offset in range(self.size_bytes, size_bytes, PAGE_SIZE_BYTES):
            self.memory[offset] = 1
        self.size_bytes = size_bytes

    def touch(self, pages: int, latencies_ms: list[float]) -> None:
        """Touch `pages` pages round-robin, timing chunks of TOUCH_CHUNK_PAGES."""
        if self.size_bytes == 0:
            return
        memory = self.memory
        for _ in range(0, pages, TOUCH_CHUNK_PAGES):
            started = time.perf_counter()
            for _ in range(TOUCH_CHUNK_PAGES):
                memory[self.cursor] = (memory[self.cursor] + 1) & 0xFF
                self.cursor = (self.cursor + PAGE_SIZE_BYTES) % self.size_bytes
            latencies_ms.append((time.perf_counter() - started) * 1000 / TOUCH_CHUNK_PAGES)


def plan_from_flags(args: argparse.Namespace, size: int) -> PhasePlan:
    """The old single-phase flags, as a phase plan."""
    phases: list[Phase] = []
    if args.grow_to:
        phases.append(Phase("grow", parse_size_bytes(args.grow_to), grow_bytes_per_s=parse_size_bytes(args.grow_rate)))
    phases.append(Phase("idle") if args.idle else Phase("active", size))
    return PhasePlan(tuple(phases))


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Atomically (rename), so the agent never reads half a report."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(json.dumps(report))
    temporary.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="balloon-workload", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="256MiB", help="initial working set, touched once at start (default 256MiB)")
    parser.add_argument("--phases", help="phase spec (overrides --grow-to/--idle)")
    parser.add_argument("--grow-to", help="grow the working set up to this size, then stay active (or idle)")
    parser.add_argument("--grow-rate", default=f"{DEFAULT_GROW_BYTES_PER_S >> 20}MiB",
                        help="growth per second (default 32MiB)")
    parser.add_argument("--idle", action="store_true", help="touch the set once, then hold it")
    parser.add_argument("--report-interval", default="2s", help="report period (default 2s)")
    parser.add_argument("--report-file", default=os.environ.get("BALLOONLAB_WORKLOAD_REPORT"),
                        help="also write each report to this file, for the agent (env BALLOONLAB_WORKLOAD_REPORT)")
    parser.add_argument("--duration", help="stop after this long (default: run until SIGTERM)")
    args = parser.parse_args(argv)
    try:
        size = parse_size_bytes(args.size)
        plan = parse_phases(args.phases) if args.phases else plan_from_flags(args, size)
        report_ms = parse_duration_ms(args.report_interval)
        duration_ms = parse_duration_ms(args.duration) if args.duration else None
    except (ValueError, PhaseSpecError) as exc:
        parser.error(str(exc))
    report_file = Path(args.report_file) if args.report_file else None
    return run(plan, size, report_ms, duration_ms, report_file)


def run(plan: PhasePlan, size: int, report_ms: int, duration_ms: int | None, report_file: Path | None) -> int:
    working_set = WorkingSet(plan.max_size_bytes(size))
    working_set.resize(size)
    flags = {"retouch": False, "stop": False}
    signal.signal(signal.SIGUSR1, lambda *_: flags.update(retouch=True))
    signal.signal(signal.SIGTERM, lambda *_: flags.update(stop=True))
    signal.signal(signal.SIGINT, lambda *_: flags.update(stop=True))

    def clock_ms() -> int:
        return time.monotonic_ns() // 1_000_000

    started = last_report = last_grow = clock_ms()
    clock = PhaseClock(0, started)
    entered: PhaseClock | None = None
    latencies: list[float] = []
    touched = 0
    print(json.dumps({"event": "ready", "size_bytes": working_set.size_bytes}), flush=True)
    while not flags["stop"]:
        now = clock_ms()
        if duration_ms is not None and now - started >= duration_ms:
            break
        clock = advance(plan, clock, now, working_set.size_bytes)
        phase = Phase("idle") if clock.finished else plan.phases[clock.index]
        if entered != clock:  # a new phase (or the same one again, after "repeat")
            entered = clock
            if phase.kind == "active" and phase.size_bytes is not None:
                working_set.resize(phase.size_bytes)
            print(json.dumps({"event": "phase", "phase": clock.index, "spec": phase.describe(),
                              "size_bytes": working_set.size_bytes}), flush=True)
            last_grow = now
        if flags["retouch"]:
            flags["retouch"] = False
            t0 = time.perf_counter()
            working_set.touch(working_set.size_bytes // PAGE_SIZE_BYTES, latencies)
            touched += working_set.size_bytes // PAGE_SIZE_BYTES
            print(json.dumps({"event": "retouched", "pages": working_set.size_bytes // PAGE_SIZE_BYTES,
                              "seconds": round(time.perf_counter() - t0, 3)}), flush=True)
        if phase.kind == "grow" and phase.size_bytes is not None:
            if now - last_grow >= 100:
                # Grow smoothly, a tenth of the per-second rate every 100 ms, as real programs do.
                step = max(PAGE_SIZE_BYTES, (phase.grow_bytes_per_s // 10) & ~(PAGE_SIZE_BYTES - 1))
                working_set.resize(min(phase.size_bytes, working_set.size_bytes + step))
                last_grow = now
            time.sleep(0.01)
        elif phase.kind == "idle":
            time.sleep(0.05)
        else:
            pages = 4096
            working_set.touch(pages, latencies)
            touched += pages
            if phase.touch_pages_per_s:
                time.sleep(pages / phase.touch_pages_per_s)  # a rate cap: this chunk's share of a second
        if now - last_report >= report_ms:
            ordered = sorted(latencies)
            report = {
                "event": "report", "phase": clock.index, "phase_kind": phase.kind,
                "size_bytes": working_set.size_bytes,
                "touches_per_s": round(touched * 1000 / max(1, now - last_report)),
                "latency_p50_us": round(percentile(ordered, 0.5) * 1000, 2),
                "latency_p99_us": round(percentile(ordered, 0.99) * 1000, 2),
                "ts": round(time.time(), 3),
            }
            print(json.dumps(report), flush=True)
            if report_file is not None:
                try:
                    write_report(report_file, report)
                except OSError as exc:
                    print(json.dumps({"event": "warning", "detail": f"cannot write {report_file}: {exc}"}),
                          file=sys.stderr, flush=True)
            latencies, touched, last_report = [], 0, now
    return 0


if __name__ == "__main__":
    sys.exit(main())
