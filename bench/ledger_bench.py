"""The review's ledger and page-bin attacks (security review S9, S10, S12), timed per frame.

    python -m bench ledger_bench
    python -m bench.ledger_bench --compare-rev 521624d   # also the ledger and pages.py of a revision

Times are CPU time of this process (time.process_time), so other load on the machine moves
them less than wall time. S9: 10 lock frames of 32,768 one-page, non-adjacent ranges from one vm (64 KiB frames). Each
frame's pages interleave the earlier frames', so every range lands inside the ledger, not at its
end. S10: 2,001 PFN vms holding a range each, then one PFN lock of 32,768 one-page ranges. S12:
a `pages` bin of 1 MiB of 1-byte varints (valid msgpack, refused by the range limit), and one at
the new byte limit (the most a bin may make the decoder read).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from hostd.ledger import Ledger
from protocol import PageRanges, ProtocolError
from protocol.limits import MAX_PAGE_RANGES_WIRE_BYTES, MAX_RANGES_PER_MESSAGE

RANGES_PER_FRAME = MAX_RANGES_PER_MESSAGE  # 32,768
LOCK_FRAMES = 10
PFN_VMS = 2_001
BIG_CAP_PAGES = 1 << 40  # an adopt lock's cap is the claimed memsz: no cap in practice


def interleaved_frame(frame: int, frames: int = LOCK_FRAMES, ranges: int = RANGES_PER_FRAME) -> PageRanges:
    """Frame f: pages 2·(frames·i + f) for i < ranges: one page each, never adjacent, and
    between the pages of every earlier frame."""
    return PageRanges(tuple((2 * (frames * i + frame), 1) for i in range(ranges)))


def ledger_lock_frames(ledger_class: Callable[[], Any], frames: int = LOCK_FRAMES) -> list[float]:
    """S9: seconds per lock frame, in order."""
    ledger = ledger_class()
    ledger.register("evil", "vpn")
    batches = [interleaved_frame(f, frames) for f in range(frames)]
    seconds = []
    for batch in batches:
        started = time.process_time()
        results = ledger.lock("evil", batch, BIG_CAP_PAGES, True)
        seconds.append(time.process_time() - started)
        assert all(r.status == 0 for r in results)
    assert ledger.held_pages("evil") == frames * RANGES_PER_FRAME
    return seconds


def ledger_pfn_vms(ledger_class: Callable[[], Any], vms: int = PFN_VMS) -> float:
    """S10: seconds for one 32,768-range PFN lock beside `vms` − 1 other PFN vms."""
    ledger = ledger_class()
    for index in range(vms - 1):
        ledger.register(f"fake{index}", "pfn")
        ledger.lock(f"fake{index}", PageRanges((((1 << 30) + 2 * index, 1),)), BIG_CAP_PAGES, False)
    ledger.register("evil", "pfn")
    batch = interleaved_frame(0, 1)
    started = time.process_time()
    results = ledger.lock("evil", batch, BIG_CAP_PAGES, False)
    elapsed = time.process_time() - started
    assert all(r.status == 0 for r in results)
    return elapsed


def varint_bomb(page_ranges: Any, size_bytes: int, repeat: int = 5, data: bytes | None = None) -> float:
    """S12: best seconds of `repeat` to refuse a bin of `size_bytes` 1-byte varints (or `data`)."""
    data = b"\x01" * size_bytes if data is None else data
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        try:
            page_ranges.from_wire(data)
        except ProtocolError:
            pass
        else:
            raise AssertionError("a varint bomb was accepted")
        best = min(best, time.process_time() - started)
    return best


def largest_valid_bin(page_ranges: Any, repeat: int = 5) -> float:
    """Seconds to decode a valid bin of MAX_RANGES_PER_MESSAGE one-page ranges (the honest maximum)."""
    data = interleaved_frame(0, 1).to_wire()
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        page_ranges.from_wire(data)
        best = min(best, time.process_time() - started)
    return best


def _module_from_rev(rev: str, path: str, name: str, scratch: Path) -> ModuleType:
    source = subprocess.run(["git", "show", f"{rev}:{path}"], check=True, capture_output=True, text=True).stdout
    file = scratch / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def report(label: str, ledger_class: Callable[[], Any], page_ranges: Any) -> dict[str, Any]:
    frames = ledger_lock_frames(ledger_class)
    pfn_s = ledger_pfn_vms(ledger_class)
    bomb_s = varint_bomb(page_ranges, 1 << 20)
    at_limit_s = varint_bomb(page_ranges, MAX_PAGE_RANGES_WIRE_BYTES)
    # The most a bin within both limits makes the decoder parse: 32,768 ranges of 8-byte gaps
    # (2**49) and 3-byte counts (2**14), refused only after parsing (too many pages).
    longest = (b"\x80" * 7 + b"\x01" + b"\x80\x80\x01") * RANGES_PER_FRAME
    longest_s = varint_bomb(page_ranges, len(longest), data=longest)
    valid_s = largest_valid_bin(page_ranges)
    print(f"ledger ({label}): S9, {LOCK_FRAMES} lock frames of {RANGES_PER_FRAME:,} one-page ranges (CPU ms per frame)")
    print("  " + " ".join(f"{s * 1000:.0f}" for s in frames) + f"   total {sum(frames):.2f} s")
    print(f"ledger ({label}): S10, one {RANGES_PER_FRAME:,}-range PFN lock beside {PFN_VMS - 1:,} PFN vms: "
          f"{pfn_s * 1000:.0f} CPU ms")
    print(f"pages ({label}): S12, 1-byte varints refused in CPU ms: 1 MiB {bomb_s * 1000:.2f}, "
          f"{MAX_PAGE_RANGES_WIRE_BYTES:,} bytes {at_limit_s * 1000:.2f}; the longest bin within the limits "
          f"({len(longest):,} bytes, 11-byte ranges) {longest_s * 1000:.2f}; "
          f"a valid {RANGES_PER_FRAME:,}-range bin decoded in {valid_s * 1000:.1f}")
    return {"lock_frames_s": frames, "pfn_lock_s": pfn_s, "varint_bomb_1mib_s": bomb_s,
            "varint_bomb_at_limit_s": at_limit_s, "longest_bin_s": longest_s, "valid_bin_s": valid_s}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ledger_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--compare-rev", help="also time hostd/ledger.py and protocol/pages.py of this git revision")
    args = parser.parse_args(argv if argv is not None else [])
    if args.compare_rev:
        with tempfile.TemporaryDirectory() as scratch:
            old_ledger = _module_from_rev(args.compare_rev, "hostd/ledger.py", "_old_ledger", Path(scratch))
            old_pages = _module_from_rev(args.compare_rev, "protocol/pages.py", "_old_pages", Path(scratch))
            report(f"at {args.compare_rev}", old_ledger.Ledger, old_pages.PageRanges)
        print()
    report("this tree", Ledger, PageRanges)


def run() -> dict[str, Any]:
    """The figures of this tree, for `python -m bench ledger_bench --json`."""
    return report("this tree", Ledger, PageRanges)


if __name__ == "__main__":
    main(sys.argv[1:])
