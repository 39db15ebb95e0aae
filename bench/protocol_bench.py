"""Encode/decode rate per message kind, and the wire size of a 1 GiB balloon's page list.

    python -m bench protocol_bench
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable
from typing import Any

from protocol import Lock, PageRanges, decode, encode
from protocol.limits import MAX_RANGES_PER_MESSAGE
from tests.samples import SAMPLES

ONE_GIB_PAGES = 262_144


def _rate(function: Callable[[], object], seconds: float = 0.3) -> float:
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(200):
            function()
        count += 200
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def fragmented_pfns(rng: random.Random) -> list[int]:
    """Pages the way a real allocator hands out PFNs under memory churn: short runs
    (1–16 pages, geometric-ish) at scattered frame numbers across a 24 GiB machine."""
    pages: list[int] = []
    frame_space = (24 << 30) // 4096
    while len(pages) < ONE_GIB_PAGES:
        run = min(1 << rng.randint(0, 4), ONE_GIB_PAGES - len(pages))
        start = rng.randrange(frame_space - run)
        pages.extend(range(start, start + run))
    return pages


def page_list_sizes() -> list[tuple[str, int, int, int, float]]:
    rng = random.Random(7)
    rows = []
    contiguous = list(range(1 << 20, (1 << 20) + ONE_GIB_PAGES))
    for label, pages in (("contiguous VPNs", contiguous), ("fragmented PFNs", fragmented_pfns(rng))):
        started = time.perf_counter()
        ranges = PageRanges.from_pages(pages)
        build_ms = (time.perf_counter() - started) * 1000
        chunks = ranges.split(ONE_GIB_PAGES, MAX_RANGES_PER_MESSAGE)
        frames = [encode(Lock(pages=chunk, adopt=False), 1) for chunk in chunks]
        rows.append((label, len(ranges.ranges), len(frames), sum(len(f) for f in frames), build_ms))
    return rows


def run() -> dict[str, Any]:
    kinds: dict[str, dict[str, int]] = {}
    for kind, message in sorted(SAMPLES.items()):
        frame = encode(message, 1)
        kinds[kind] = {"bytes": len(frame), "encode_per_s": round(_rate(functools.partial(encode, message, 1))),
                       "decode_per_s": round(_rate(functools.partial(decode, frame)))}
    pages = [{"page_list": label, "ranges": ranges, "frames": frames, "bytes": size, "build_ms": round(build_ms, 1)}
             for label, ranges, frames, size, build_ms in page_list_sizes()]
    return {"kinds": kinds, "one_gib_page_lists": pages}


def report(figures: dict[str, Any]) -> None:
    print("protocol: encode/decode rate per kind (messages/s, one core)")
    print(f"{'kind':<18}{'bytes':>7}{'encode/s':>12}{'decode/s':>12}")
    for kind, row in figures["kinds"].items():
        print(f"{kind:<18}{row['bytes']:>7}{row['encode_per_s']:>12,}{row['decode_per_s']:>12,}")
    print()
    print("protocol: a 1 GiB balloon (262,144 pages) as lock frames")
    print(f"{'page list':<18}{'ranges':>9}{'frames':>8}{'bytes':>10}{'build ms':>10}")
    for row in figures["one_gib_page_lists"]:
        print(f"{row['page_list']:<18}{row['ranges']:>9,}{row['frames']:>8}{row['bytes']:>10,}{row['build_ms']:>10.1f}")


def main() -> None:
    report(run())
