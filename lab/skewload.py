"""A workload with a realistic access skew, for `balloonctl experiment balloon-vs-swap`: a hot
set (anonymous memory) that takes most accesses and a cold set that takes the rest, each
access to a page chosen at random within its set. The cold set is anonymous memory
(`--cold-kind anon`) or a file's page cache read with pread (`--cold-kind file`): memory no
process maps, which the guest's kernel can drop for free but blind host swap
(process_madvise) cannot reach.

    python -m lab.skewload --hot 48MiB --cold 160MiB --hot-fraction 0.9 --cold-kind file

Reports like balloon-workload (touches_per_s, latency_p50_us, latency_p99_us, size_bytes, ts)
to stdout and to --report-file (BALLOONLAB_WORKLOAD_REPORT), so the guest's agent forwards them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from guestagent.workload import percentile, write_report
from protocol.units import parse_duration_ms, parse_size_bytes

PAGE = 4096
CHUNK = 64  # accesses timed together (a clock read per access would dominate)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="skewload", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hot", default="48MiB")
    parser.add_argument("--cold", default="160MiB")
    parser.add_argument("--hot-fraction", type=float, default=0.9, help="share of accesses to the hot set")
    parser.add_argument("--cold-kind", choices=("anon", "file"), default="anon")
    parser.add_argument("--file-dir", default="/var/tmp", help="where the cold file goes (a disk, not tmpfs)")
    parser.add_argument("--report-interval", default="1s")
    parser.add_argument("--report-file", default=os.environ.get("BALLOONLAB_WORKLOAD_REPORT"))
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    hot_pages, cold_pages = parse_size_bytes(args.hot) // PAGE, parse_size_bytes(args.cold) // PAGE
    if not 0.0 <= args.hot_fraction <= 1.0 or hot_pages < 1 or cold_pages < 1:
        parser.error("--hot and --cold at least a page, 0 ≤ --hot-fraction ≤ 1")
    report_ms = parse_duration_ms(args.report_interval)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))

    rng = random.Random(args.seed)
    hot = mmap.mmap(-1, hot_pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    cold_fd = -1
    cold: mmap.mmap | None = None
    if args.cold_kind == "anon":
        cold = mmap.mmap(-1, cold_pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for page in range(cold_pages):
            cold[page * PAGE] = 1
    else:  # written here, so its page cache is charged to this guest's cgroup; then only pread
        cold_fd, name = tempfile.mkstemp(prefix="skewload-cold-", dir=args.file_dir)
        os.unlink(name)
        block = os.urandom(PAGE) * 256
        for _ in range(0, cold_pages, 256):
            os.write(cold_fd, block)
    for page in range(hot_pages):
        hot[page * PAGE] = 1
    report_file = Path(args.report_file) if args.report_file else None
    print(json.dumps({"event": "ready", "hot_bytes": hot_pages * PAGE, "cold_bytes": cold_pages * PAGE,
                      "cold_kind": args.cold_kind}), flush=True)

    latencies: list[float] = []
    touched = 0
    last_report = time.monotonic()
    randrange, rand, fraction = rng.randrange, rng.random, args.hot_fraction
    while not stop["now"]:
        started = time.perf_counter()
        for _ in range(CHUNK):
            if rand() < fraction:
                offset = randrange(hot_pages) * PAGE
                hot[offset] = (hot[offset] + 1) & 0xFF
            elif cold is not None:
                offset = randrange(cold_pages) * PAGE
                cold[offset] = (cold[offset] + 1) & 0xFF
            else:
                os.pread(cold_fd, 1, randrange(cold_pages) * PAGE)
        latencies.append((time.perf_counter() - started) * 1e6 / CHUNK)
        touched += CHUNK
        now = time.monotonic()
        if (now - last_report) * 1000 >= report_ms:
            ordered = sorted(latencies)
            report = {"event": "report", "phase_kind": "active", "size_bytes": (hot_pages + cold_pages) * PAGE,
                      "touches_per_s": round(touched / (now - last_report)),
                      "latency_p50_us": round(percentile(ordered, 0.5), 2),
                      "latency_p99_us": round(percentile(ordered, 0.99), 2), "ts": round(time.time(), 3)}
            print(json.dumps(report), flush=True)
            if report_file is not None:
                with contextlib.suppress(OSError):
                    write_report(report_file, report)
            latencies, touched, last_report = [], 0, now
    return 0


if __name__ == "__main__":
    sys.exit(main())
