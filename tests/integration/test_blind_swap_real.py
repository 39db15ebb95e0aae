"""Blind host swap on a real cgroup with swap (root): hostd's reclaimer pages out random
resident pages of the guest's processes itself (process_madvise MADV_PAGEOUT), then holds the
cgroup's limit there. The guest's swap rises with its limit held, and the pages taken are
random: a hot set is paged out in proportion to its size, not spared as an LRU would."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from hostd.cgroupfs import CgroupfsBackend
from hostd.host_actions import HostAction
from hostd.reclaim import HostReclaimer
from lab import cgroups
from tests.conftest import require, require_root, require_swap
from tests.integration.cgroups import remove_tree

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.swap, pytest.mark.timeout(180)]
MiB = 1 << 20
PAGE = 4096
PARENT_PREFIX = "balloonlab-test-blind"
HOT, COLD = 32 * MiB, 96 * MiB

# A guest process: a cold set touched once, then a hot set touched over and over; it prints
# both addresses once both are resident.
GUEST = f"""
import ctypes, json, mmap, sys
hot = mmap.mmap(-1, {HOT}, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
cold = mmap.mmap(-1, {COLD}, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for offset in range(0, {COLD}, 4096):
    cold[offset] = 1
for offset in range(0, {HOT}, 4096):
    hot[offset] = 1
address = lambda m: ctypes.addressof(ctypes.c_char.from_buffer(m))
print(json.dumps({{"hot": address(hot), "cold": address(cold)}}), flush=True)
while True:
    for offset in range(0, {HOT}, 4096):
        hot[offset] = (hot[offset] + 1) & 0xFF
"""


def kernel_at_least(major: int, minor: int) -> bool:
    numbers = platform.release().split("-")[0].split(".")
    return (int(numbers[0]), int(numbers[1])) >= (major, minor)


def swapped_fraction(pid: int, address: int, size: int) -> float:
    """The fraction of [address, address + size) not resident (paged out) right now."""
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        pagemap.seek(address // PAGE * 8)
        entries = np.frombuffer(pagemap.read(size // PAGE * 8), dtype=np.uint64)
    return float(((entries & np.uint64(1 << 63)) == 0).mean())


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[tuple[str, Path, subprocess.Popen[str], dict[str, int]]]:
    require_root()
    require_swap(1 << 30)
    require(kernel_at_least(5, 10), f"process_madvise needs Linux ≥ 5.10 (this is {platform.release()})")
    version = cgroups.memory_cgroup_version()
    hierarchy = cgroups.memory_hierarchy(version)
    for stale in hierarchy.glob(f"{PARENT_PREFIX}-*"):  # an interrupted earlier run's
        remove_tree(stale)
    parent = cgroups.create_parent(version, f"{PARENT_PREFIX}-{uuid.uuid4().hex[:8]}")
    path = cgroups.create_guest(parent, version, "g", 256 * MiB, 256 * MiB)
    process = subprocess.Popen([sys.executable, "-c", GUEST], stdout=subprocess.PIPE, text=True,
                               preexec_fn=lambda: (path / "cgroup.procs").write_text(str(os.getpid())))
    try:
        assert process.stdout is not None
        addresses = json.loads(process.stdout.readline())
        time.sleep(1.0)  # the hot set touched a few times more
        yield str(path.relative_to(hierarchy)), path, process, addresses
    finally:
        process.kill()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()
        remove_tree(parent)


def test_blind_pageout_swaps_random_pages_and_the_limit_holds_them_out(tmp_path, guest) -> None:
    cgroup, path, process, addresses = guest
    version = cgroups.memory_cgroup_version()
    reclaimer = HostReclaimer({"g": cgroup}, tmp_path / "vswap.json", CgroupfsBackend())
    reading = reclaimer.read("g")
    before = cgroups.usage(path, version)
    take = 64 * MiB
    limit = reading.usage_bytes - take
    process.send_signal(signal.SIGSTOP)  # the hot loop stops: what is swapped stays swapped to be counted
    try:
        failures = reclaimer.apply([HostAction("g", cgroup, "pageout", take), HostAction("g", cgroup, "limit", limit)])
        assert failures == []
        result = reclaimer.last_pageout[cgroup]
        print(result.describe())
        hot = swapped_fraction(process.pid, addresses["hot"], HOT)
        cold = swapped_fraction(process.pid, addresses["cold"], COLD)
        after = cgroups.usage(path, version)
    finally:
        process.send_signal(signal.SIGCONT)
    print(f"before {before}, after {after}; hot paged out {hot:.2f}, cold {cold:.2f}")
    assert result.chosen_pages == take // PAGE and result.advised_bytes >= 0.9 * take
    assert after["swap_bytes"] is not None and before["swap_bytes"] is not None
    assert after["swap_bytes"] - before["swap_bytes"] > 0.6 * take  # the guest's swap rose by about what was taken
    assert CgroupfsBackend().limit_bytes(cgroup) == limit  # held there
    # Random, not LRU-cold first: 64 of the ~130 MiB resident is ~half of each set. An LRU would
    # take the 96 MiB cold set and spare the hot one; generous bounds around the proportion.
    assert 0.25 < hot < 0.75 and 0.25 < cold < 0.75
    assert 0.5 < hot / cold < 2.0
    # The guest runs on under the held limit: it faults its hot set back in and cannot
    # grow past the limit, so what it holds beyond stays in swap.
    time.sleep(2.0)
    running = cgroups.usage(path, version)
    assert running["memory_bytes"] is not None and running["memory_bytes"] <= limit + 2 * MiB
    assert (running["swap_bytes"] or 0) > 0.5 * take
    reclaimer.restore_all()
    assert CgroupfsBackend().limit_bytes(cgroup) == 256 * MiB  # its own limit back at exit
