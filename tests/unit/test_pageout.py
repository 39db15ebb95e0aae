"""Blind host swap's page choice (hostd/pageout.py), pure and seeded; the blind mode's actions
in the core and its configuration."""

import random

import numpy as np
import pytest

from hostd.config import ConfigError, HostConfig, load_config
from hostd.pageout import Run, choose_ranges, merge, page_out, parse_smaps, resident_runs
from protocol.limits import PAGE_SIZE_BYTES as PAGE
from tests.unit.test_core import Harness, MiB

SMAPS = """\
55d0c0a00000-55d0c0a21000 r-xp 00000000 08:01 131 /usr/bin/python3.11
Size:                132 kB
Rss:                 132 kB
VmFlags: rd ex mr mw me sd
7f0000000000-7f0004000000 rw-p 00000000 00:00 0
Size:              65536 kB
Rss:               40000 kB
Locked:                0 kB
VmFlags: rd wr mr mw me ac sd
7f1000000000-7f1001000000 rw-s 00000000 00:01 7 /memfd:balloon (deleted)
Size:              16384 kB
Rss:               16384 kB
VmFlags: rd wr sh mr mw me ms lo sd
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
Size:                  4 kB
Rss:                   4 kB
VmFlags: ex
"""


def test_smaps_gives_each_mapping_its_rss_and_why_pageout_may_refuse_it():
    vmas = parse_smaps(SMAPS)
    assert [(v.start, v.rss_bytes) for v in vmas] == [(0x55D0C0A00000, 132 * 1024), (0x7F0000000000, 40000 * 1024),
                                                      (0x7F1000000000, 16384 * 1024),
                                                      (0xFFFFFFFFFF600000, 4096)]
    assert [v.refusal() for v in vmas] == [None, None, "locked", "special mapping"]
    assert vmas[0].path == "/usr/bin/python3.11" and vmas[1].path == ""


def test_resident_runs_are_pages_present_and_mapped_by_this_process_alone():
    present, exclusive, swapped = 1 << 63, 1 << 56, 1 << 62
    entries = np.array([present | exclusive, present | exclusive, 0, swapped, present, present | exclusive,
                        present | exclusive, present | exclusive], dtype=np.uint64)
    runs = resident_runs(7, 0x1000_0000, entries, False)
    # page 4 is present but shared (the kernel skips it): not chosen, so what is chosen can go
    assert runs == [Run(7, 0x1000_0000, 2), Run(7, 0x1000_0000 + 5 * PAGE, 3)]
    assert resident_runs(7, 0, np.zeros(4, dtype=np.uint64), True) == []


def test_choose_ranges_takes_exactly_what_is_asked_without_overlap_and_is_seeded():
    runs = [Run(1, 0x10_0000, 1000), Run(2, 0x40_0000, 3000, True)]
    chosen = choose_ranges(runs, 1234, 16, random.Random(5))
    assert sum(r.pages for r in chosen) == 1234
    assert chosen == choose_ranges(runs, 1234, 16, random.Random(5))  # seeded: reproducible
    assert chosen != choose_ranges(runs, 1234, 16, random.Random(6))
    pages = [(r.pid, r.address + i * PAGE) for r in chosen for i in range(r.pages)]
    assert len(pages) == len(set(pages))  # no page twice
    for r in chosen:  # every chosen page is one of the resident ones
        source = next(s for s in runs if s.pid == r.pid)
        assert source.address <= r.address and r.address + r.pages * PAGE <= source.address + source.pages * PAGE
        assert r.file == source.file
    assert sum(r.pages for r in choose_ranges(runs, 10**6, 16, random.Random(1))) == 4000  # all there is
    assert choose_ranges(runs, 0, 16, random.Random(1)) == []


def test_the_choice_is_blind_a_hot_set_goes_in_proportion_to_its_size():
    """ESX picks host-swapped pages at random: whatever the recency, each resident page is
    equally likely. Here a 'hot' run of 2048 pages beside a 'cold' one of 6144: half the
    memory taken takes half of each (a guest's LRU would take the cold one first)."""
    hot, cold = Run(1, 0x1000_0000, 2048), Run(1, 0x2000_0000, 6144)
    fractions = []
    for seed in range(50):
        chosen = choose_ranges([hot, cold], 4096, 16, random.Random(seed))
        hot_pages = sum(r.pages for r in chosen if r.address < 0x2000_0000)
        fractions.append(hot_pages / 2048)
    assert 0.4 < sum(fractions) / len(fractions) < 0.6
    assert min(fractions) > 0.3 and max(fractions) < 0.7  # each draw, not only on average


def test_ranges_are_aligned_to_the_grain_and_merged_when_adjacent():
    chosen = choose_ranges([Run(1, 0x10_0000 + 3 * PAGE, 40)], 40, 16, random.Random(0))
    assert chosen == [Run(1, 0x10_0000 + 3 * PAGE, 40)]  # every chunk taken: merged back into one
    assert merge([Run(1, 0, 1), Run(1, PAGE, 1), Run(2, 2 * PAGE, 1)]) == [Run(1, 0, 2), Run(2, 2 * PAGE, 1)]


def test_page_out_adds_up_what_each_process_offers_and_what_it_leaves_out():
    def runs_of(pid):
        return [Run(pid, 0x10_0000, 100, pid == 2)], {"locked": 8 * MiB}

    result = page_out([999_999_998, 999_999_999], 150 * PAGE, random.Random(3), runs_of=runs_of)
    assert result.resident_pages == 200 and result.chosen_pages == 150
    assert result.anon_pages + result.file_pages == 150
    assert result.skipped_bytes == {"locked": 16 * MiB}
    assert result.advised_bytes == 0  # those pids do not exist: nothing advised, no error
    assert "150 of 150 pages" in result.describe()


# ---- the mode: configuration and the core's actions ---------------------------------------
def test_vswap_mode_is_limit_by_default_blind_on_request_and_nothing_else():
    assert HostConfig().vswap_mode == "limit"
    assert load_config(["--vswap-mode", "blind"], {}).vswap_mode == "blind"
    assert load_config([], {"BALLOONLAB_VSWAP_MODE": "blind"}).vswap_mode == "blind"
    with pytest.raises(ConfigError, match="vswap_mode"):
        HostConfig(vswap_mode="random")


def _squeezed(mode):
    h = Harness(host_memory_bytes=600 * MiB, vm_cgroups={"plain": "lab/plain"}, vswap_step_bytes=64 * MiB,
                vswap_mode=mode)
    h.core.observe_cgroup("plain", 580 * MiB, 0, 1024 * MiB, h.now)
    h.tick()
    return h, h.core.host_actions(h.now)


def test_blind_mode_pages_out_what_the_step_takes_then_holds_the_limit_there():
    _, limited = _squeezed("limit")
    assert [a[2] for a in limited] == ["limit"]
    limit = limited[0][3]
    assert limit is not None and limit < 580 * MiB
    h, blind = _squeezed("blind")
    # the same limit, preceded by hostd's own pageout of what the step takes
    assert blind == [("plain", "lab/plain", "pageout", 580 * MiB - limit), ("plain", "lab/plain", "limit", limit)]
    # The usage now at the limit it holds: no new pageout until the target moves.
    h.core.observe_cgroup("plain", limit, 580 * MiB - limit, 1024 * MiB, h.now)
    h.now += 1000
    h.tick()
    assert not [a for a in h.core.host_actions(h.now) if a[2] == "pageout"]


def test_blind_mode_steps_down_a_step_at_a_time_each_step_paged_out_by_hostd():
    h = Harness(host_memory_bytes=300 * MiB, vm_cgroups={"plain": "lab/plain"}, vswap_step_bytes=64 * MiB,
                vswap_mode="blind", block_max_ms=0)
    h.core.observe_cgroup("plain", 580 * MiB, 0, 1024 * MiB, h.now)
    h.tick()
    actions = h.core.host_actions(h.now)
    assert actions == [("plain", "lab/plain", "pageout", 64 * MiB), ("plain", "lab/plain", "limit", 516 * MiB)]
    # the next step goes on from what the guest holds now, again paged out by hostd first
    h.core.observe_cgroup("plain", 510 * MiB, 70 * MiB, 1024 * MiB, h.now)
    h.now += 1000
    h.tick()
    actions = h.core.host_actions(h.now)
    assert actions == [("plain", "lab/plain", "pageout", 64 * MiB), ("plain", "lab/plain", "limit", 446 * MiB)]
