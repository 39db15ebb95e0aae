from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guestagent.agent import (
    PacingConfig,
    detect_pressure,
    givable_bytes,
    next_rate,
    plan,
    pressure_release_pages,
)
from guestagent.cgroup import GuestReading

MiB = 1 << 20
CFG = PacingConfig()


def reading(**overrides) -> GuestReading:
    base = dict(
        cgroup_version=2, limit_bytes=512 * MiB, usage_bytes=200 * MiB, anon_bytes=150 * MiB, file_bytes=40 * MiB,
        active_anon_bytes=100 * MiB, inactive_anon_bytes=50 * MiB, active_file_bytes=20 * MiB,
        inactive_file_bytes=20 * MiB, unevictable_bytes=0, swap_used_bytes=0, swap_limit_bytes=None,
        swap_in_pages=0, swap_out_pages=0, minor_faults=0, major_faults=0, refault_anon_pages=0, oom_events=0,
        oom_kill_events=0,
        high_events=0, max_events=0, psi_some_avg10=0.0, psi_full_avg10=0.0, psi_full_total_us=0,
    )
    base.update(overrides)
    return GuestReading(**base)


@pytest.mark.parametrize(
    ("overrides", "swap_free", "expected_mib"),
    [
        # room 312 + cache 32 (80 % of 40) + one swap step 4 (of 50 inactive anon) − margin 30.72 (6 % of 512)
        ({}, 1 << 40, 312 + 32 + 4 - 30.72),
        ({}, 0, 312 + 32 - 30.72),  # no host swap: anon cannot move
        ({"swap_limit_bytes": 60 * MiB, "swap_used_bytes": 58 * MiB}, 1 << 40, 312 + 32 + 2 - 30.72),
        ({"inactive_anon_bytes": 0, "active_anon_bytes": 300 * MiB}, 1 << 40, 312 + 32 - 30.72),  # hot set
        ({"usage_bytes": 512 * MiB, "active_file_bytes": 0, "inactive_file_bytes": 0}, 0, 0),
        ({"usage_bytes": 500 * MiB, "active_file_bytes": 0, "inactive_file_bytes": 0}, 1 << 40, 4),  # a swap step
    ],
    ids=["swap-rich", "no-host-swap", "swap-limit-nearly-full", "active-working-set", "full-no-swap",
         "full-with-swap"],
)
def test_givable_table(overrides, swap_free, expected_mib):
    assert givable_bytes(reading(**overrides), swap_free, 1 << 40, CFG) == pytest.approx(expected_mib * MiB, abs=1)


def test_unpaced_headroom_counts_all_swappable_inactive_anon():
    assert givable_bytes(reading(), 1 << 40, 0, CFG, paced=False) == pytest.approx((312 + 32 + 50 - 30.72) * MiB, abs=1)


def test_unlimited_cgroup_uses_host_available():
    assert givable_bytes(reading(limit_bytes=None), 0, 1000 * MiB, CFG) == (1000 + 32 - 24) * MiB  # min margin


@pytest.mark.parametrize(
    ("previous", "current", "givable", "expected"),
    [
        ({}, {}, 10 * MiB, None),
        ({}, {"oom_kill_events": 1}, 10 * MiB, "oom_kill in guest"),
        ({}, {"oom_events": 2}, 10 * MiB, "oom event in guest"),
        ({}, {"high_events": 5}, 10 * MiB, "memory.high event in guest"),
        ({}, {"psi_full_avg10": 12.0}, 10 * MiB, "PSI full"),
        ({}, {}, -1, "headroom gone"),
        ({"oom_kill_events": None}, {"oom_kill_events": 3}, 10 * MiB, None),  # unknown before: no signal
        ({"refault_anon_pages": 100}, {"refault_anon_pages": 5100}, 10 * MiB, "thrashing"),  # 50k/s > 1.3k/s
        ({"refault_anon_pages": 100}, {"refault_anon_pages": 200}, 10 * MiB, None),  # 1k/s: below 1 % of memsz
        ({"max_events": 10}, {"max_events": 20}, 10 * MiB, "guest at its limit"),  # 100/s while holding
    ],
)
def test_pressure_table(previous, current, givable, expected):
    reason = detect_pressure(reading(**previous), reading(**current), givable, CFG)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and reason.startswith(expected)


def test_limit_hits_while_pinning_are_not_pressure():
    assert detect_pressure(reading(max_events=10), reading(max_events=20), 10 * MiB, CFG, 0.1,
                           pinned_since_last=True) is None


def test_pressure_release_is_a_large_step():
    assert pressure_release_pages(40_000, -1, CFG) == 10_000  # a quarter
    assert pressure_release_pages(40_000, -100 * MiB, CFG) == 25_600  # the shortfall, if larger
    assert pressure_release_pages(100, -1, CFG) == 100  # never more than the balloon


@pytest.mark.parametrize(
    ("kwargs", "action", "pages"),
    [
        (dict(balloon_pages=0, target_pages=0), "hold", 0),
        (dict(balloon_pages=1000, target_pages=200), "deflate", 800),
        (dict(balloon_pages=0, target_pages=10_000), "inflate", 512),  # rate 1 batch
        (dict(balloon_pages=0, target_pages=10_000, rate_batches=4), "inflate", 2048),
        (dict(balloon_pages=0, target_pages=10_000, givable=100 * 4096), "inflate", 100),
        (dict(balloon_pages=0, target_pages=10_000, givable=-5), "refuse", 0),
        (dict(balloon_pages=0, target_pages=10_000, now_ms=10, inflate_paused_until_ms=20), "hold", 0),
        (dict(balloon_pages=500, target_pages=100, now_ms=10, inflate_paused_until_ms=20), "deflate", 400),
    ],
)
def test_plan_table(kwargs, action, pages):
    args = dict(balloon_pages=0, target_pages=0, givable=1 << 40, rate_batches=1, now_ms=0,
                inflate_paused_until_ms=0, cfg=CFG)
    args.update(kwargs)
    result = plan(**args)
    assert (result.action, result.pages) == (action, pages)


def test_rate_halves_and_grows_within_bounds():
    assert next_rate(8, False, CFG) == 4
    assert next_rate(1, False, CFG) == 1
    assert next_rate(2, True, CFG) == 4
    assert next_rate(CFG.max_rate_batches, True, CFG) == CFG.max_rate_batches


@given(
    balloon=st.integers(0, 1 << 20), target=st.integers(0, 1 << 20), givable=st.integers(-(1 << 34), 1 << 34),
    rate=st.integers(1, 64), now=st.integers(0, 10_000), paused=st.integers(0, 10_000),
)
def test_plan_never_inflates_beyond_target_or_headroom(balloon, target, givable, rate, now, paused):
    result = plan(balloon_pages=balloon, target_pages=target, givable=givable, rate_batches=rate, now_ms=now,
                  inflate_paused_until_ms=paused, cfg=CFG)
    if result.action == "inflate":
        assert 0 < result.pages <= target - balloon
        assert result.pages * 4096 <= givable
        assert result.pages <= rate * CFG.batch_pages
        assert now >= paused
    if result.action == "deflate":
        assert result.pages == balloon - target > 0
    if target < balloon:
        assert result.action == "deflate"  # giving memory back is never blocked


@given(usage=st.integers(0, 512 * MiB), swap_free=st.integers(0, 1 << 32), anon=st.integers(0, 512 * MiB))
def test_givable_never_exceeds_free_plus_reclaimable(usage, swap_free, anon):
    r = reading(usage_bytes=usage, inactive_anon_bytes=anon, active_anon_bytes=0)
    g = givable_bytes(r, swap_free, 0, CFG)
    assert g <= max(0, (512 * MiB - usage) + 32 * MiB - 24 * MiB) + min(anon, swap_free, CFG.swap_step_bytes)
    assert givable_bytes(r, swap_free, 0, CFG, paced=False) <= (512 * MiB - usage) + 40 * MiB + min(anon, swap_free)


def test_reading_replace_helper_is_frozen():
    r = reading()
    assert replace(r, usage_bytes=1).usage_bytes == 1
