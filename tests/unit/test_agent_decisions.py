from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guestagent.agent import (
    PacingConfig,
    Plan,
    PressureBackoff,
    after_pressure,
    detect_pressure,
    givable_bytes,
    inflate_ceiling_pages,
    next_rate,
    plan,
    pressure_release_pages,
    soft_pressure_counts,
    working_set_cap_pages,
    workload_stats,
)
from guestagent.cgroup import GuestReading

MiB = 1 << 20
PAGE = 4096
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


def test_unpaced_headroom_counts_all_swappable_anon_active_or_not():
    # 312 MiB free + 80 % of 40 MiB cache + 150 MiB anon (100 active + 50 inactive) − 6 % margin
    expected_bytes = (312 + 32 + 150 - 30.72) * MiB
    assert givable_bytes(reading(), 1 << 40, 0, CFG, paced=False) == pytest.approx(expected_bytes, abs=1)
    # ...but never more than the swap can take
    expected_bytes = (312 + 32 + 20 - 30.72) * MiB
    assert givable_bytes(reading(), 20 * MiB, 0, CFG, paced=False) == pytest.approx(expected_bytes, abs=1)


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
        # the limit hit 300/s while holding, with 1k refaults/s (below thrashing, above a quarter of it)
        ({"max_events": 10, "refault_anon_pages": 100}, {"max_events": 40, "refault_anon_pages": 200}, 10 * MiB,
         "guest at its limit"),
        ({"max_events": 10}, {"max_events": 40}, 10 * MiB, None),  # no refaults: a new process (healthcheck)
        ({"max_events": 10, "refault_anon_pages": 100}, {"max_events": 13, "refault_anon_pages": 200}, 10 * MiB,
         None),  # 30/s: a burst (the report file, a sample)
    ],
)
def test_pressure_table(previous, current, givable, expected):
    reason = detect_pressure(reading(**previous), reading(**current), givable, CFG)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and reason.startswith(expected)


def test_limit_hits_while_pinning_are_not_pressure():
    assert detect_pressure(reading(max_events=10, refault_anon_pages=100),
                           reading(max_events=40, refault_anon_pages=200), 10 * MiB, CFG, 0.1,
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


def test_pressure_pause_doubles_per_episode_in_a_row_and_resets_after_quiet():
    backoff = PressureBackoff()
    pauses = []
    now = 1_000
    for _ in range(6):
        backoff = after_pressure(backoff, 20_000, now, CFG)
        pauses.append(backoff.paused_until_ms - now)
        now = backoff.paused_until_ms + 1_000  # pressure again after the pause: the next episode
    assert pauses == [5_000, 10_000, 20_000, 40_000, 60_000, 60_000]
    quiet = after_pressure(backoff, 30_000, now + CFG.pressure_forget_ms, CFG)
    assert (quiet.episodes_in_row, quiet.ceiling_pages) == (1, 30_000)  # a fresh start
    assert quiet.paused_until_ms - (now + CFG.pressure_forget_ms) == CFG.pressure_pause_ms


def test_pressure_during_the_pause_is_the_same_episode():
    first = after_pressure(PressureBackoff(), 20_000, 0, CFG)
    again = after_pressure(first, 15_000, 400, CFG)
    assert (again.episodes_in_row, again.ceiling_pages, again.paused_until_ms) == (1, 15_000, first.paused_until_ms)
    larger = after_pressure(again, 18_000, 800, CFG)
    assert larger.ceiling_pages == 15_000  # the ceiling only falls within an episode


def test_soft_pressure_signals_are_an_echo_right_after_a_deflate():
    assert soft_pressure_counts(PressureBackoff(), 0, CFG)
    backoff = after_pressure(PressureBackoff(), 20_000, 10_000, CFG)
    assert not soft_pressure_counts(backoff, 10_000 + CFG.pressure_cooldown_ms - 1, CFG)
    assert soft_pressure_counts(backoff, 10_000 + CFG.pressure_cooldown_ms, CFG)
    refaulting = reading(refault_anon_pages=10_000)
    assert detect_pressure(reading(), refaulting, MiB, CFG, soft_signals=False) is None
    assert detect_pressure(reading(), refaulting, MiB, CFG, soft_signals=True).startswith("thrashing")
    assert detect_pressure(reading(), reading(oom_kill_events=1), MiB, CFG, soft_signals=False) == "oom_kill in guest"
    assert detect_pressure(reading(), reading(), -MiB, CFG, soft_signals=False).startswith("headroom gone")


def test_pressure_ceiling_creeps_up_after_the_pause_slower_per_episode_faster_when_quiet():
    first = after_pressure(PressureBackoff(), 20_000, 0, CFG)
    end = first.paused_until_ms
    per_s = CFG.ceiling_relax_bytes_per_s // 4096
    assert inflate_ceiling_pages(first, end - 1, CFG) == 20_000
    one_s = inflate_ceiling_pages(first, end + 1_000, CFG) - 20_000
    assert per_s <= one_s <= per_s * 1.1  # about the base rate at first
    t = CFG.ceiling_doubling_ms
    grown = [inflate_ceiling_pages(first, end + k * t, CFG) - 20_000 for k in (1, 2, 3)]
    assert grown[1] == pytest.approx(3 * grown[0], rel=0.01)  # each doubling period adds twice the last
    assert grown[2] == pytest.approx(7 * grown[0], rel=0.01)
    second = after_pressure(first, 20_000, end + 1_000, CFG)
    assert second.episodes_in_row == 2
    assert inflate_ceiling_pages(second, second.paused_until_ms + t, CFG) - 20_000 == pytest.approx(
        grown[0] / 2, rel=0.01)  # the next episode in a row creeps at half the rate
    assert inflate_ceiling_pages(second, end + 1_000 + CFG.pressure_forget_ms, CFG) is None
    assert inflate_ceiling_pages(PressureBackoff(), 0, CFG) is None


@given(st.integers(1, 8), st.integers(0, 200_000), st.integers(0, 200_000))
def test_pressure_ceiling_never_falls_as_time_passes(episodes, t1, t2):
    backoff = PressureBackoff(episodes, 10_000, 0, 5_000)
    early, late = sorted((t1, t2))
    a, b = inflate_ceiling_pages(backoff, early, CFG), inflate_ceiling_pages(backoff, late, CFG)
    assert b is None or (a is not None and a <= b)  # None = no ceiling, which comes only later


def test_plan_refuses_at_the_pressure_ceiling_and_limits_below_it():
    args = dict(target_pages=50_000, givable=1 << 40, rate_batches=8, now_ms=0, inflate_paused_until_ms=0, cfg=CFG)
    held = plan(balloon_pages=20_000, ceiling_pages=20_000, **args)
    assert (held.action, held.transient) == ("refuse", False)
    assert plan(balloon_pages=19_900, ceiling_pages=20_000, **args).pages == 100
    headroom = plan(balloon_pages=0, **{**args, "givable": 0})
    assert (headroom.action, headroom.transient) == ("refuse", True)


@given(balloon=st.integers(0, 1 << 20), target=st.integers(0, 1 << 20), ceiling=st.integers(0, 1 << 20))
def test_plan_never_inflates_past_the_ceiling(balloon, target, ceiling):
    result = plan(balloon_pages=balloon, target_pages=target, givable=1 << 40, rate_batches=8, now_ms=0,
                  inflate_paused_until_ms=0, cfg=CFG, ceiling_pages=ceiling)
    if result.action == "inflate":
        assert balloon + result.pages <= ceiling


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"ts": 100.0, "touches_per_s": 5000, "latency_p99_us": 2.5, "size_bytes": 4096}',
         {"workload_touches_per_s": 5000, "workload_latency_p99_us": 2.5, "workload_size_bytes": 4096}),
        ('{"ts": 80.0, "touches_per_s": 5000}', {}),  # stale: the workload stopped reporting
        ('{"ts": 100.0, "touches_per_s": -1, "latency_p50_us": true, "size_bytes": "big"}', {}),
        ('{"ts": 100.0, "touches_per_s": 1e300}', {}),
        ("not json", {}),
        ("[1, 2]", {}),
        ('{"touches_per_s": 5}', {}),
    ],
)
def test_workload_report_becomes_status_stats_only_when_fresh_and_numeric(text, expected):
    assert workload_stats(text, now_s=101.0) == expected


# ---- the workload's working set caps the balloon --------------------------------------------
@pytest.mark.parametrize(("touched_ratio", "expected_mib"), [
    (0.64, 512 - 327.68 - 30.72),  # the lab's web guest: 320 MiB hot in 512 MiB
    (0.0, 512 - 30.72),  # idle: only the margin stays
    (1.0, 0),  # all hot: nothing to give
])
def test_working_set_cap_leaves_the_touched_memory_and_the_margin(touched_ratio, expected_mib):
    cap = working_set_cap_pages(512 * MiB, 512 * MiB, touched_ratio, CFG)
    assert cap == pytest.approx(expected_mib * MiB / PAGE, abs=1)


def test_working_set_cap_is_none_without_a_limit_or_a_sample():
    assert working_set_cap_pages(None, 512 * MiB, 0.5, CFG) is None
    assert working_set_cap_pages(512 * MiB, 512 * MiB, None, CFG) is None


def test_plan_refuses_at_the_working_set_cap_and_stops_short_of_it():
    common = dict(target_pages=50_000, givable=1 << 30, rate_batches=8, now_ms=0, inflate_paused_until_ms=0, cfg=CFG)
    at_cap = plan(balloon_pages=30_000, working_set_cap=30_000, **common)
    assert at_cap.action == "refuse" and not at_cap.transient and "working set" in at_cap.reason
    near_cap = plan(balloon_pages=29_900, working_set_cap=30_000, **common)
    assert near_cap == Plan("inflate", 100, "below target")
    assert plan(balloon_pages=29_900, **common).pages == 8 * CFG.batch_pages  # no cap: the rate limits


@pytest.mark.parametrize(
    ("previous", "current", "balloon_delta_mib", "interval_s", "fires"),
    [
        # a workload writing 50 MiB in 100 ms with 10 MiB of room: a sudden need
        ({"usage_bytes": 450 * MiB}, {"usage_bytes": 500 * MiB}, 0, 0.1, True),
        # the same growth with the room to take another interval of it: no
        ({"usage_bytes": 200 * MiB}, {"usage_bytes": 250 * MiB}, 0, 0.1, False),
        # the balloon's own pins made the growth: no
        ({"usage_bytes": 450 * MiB}, {"usage_bytes": 500 * MiB}, 50, 0.1, False),
        # at the limit usage stands still and the kernel swaps the workload out: demand is in swap
        ({"usage_bytes": 510 * MiB, "swap_used_bytes": 0}, {"usage_bytes": 510 * MiB, "swap_used_bytes": 40 * MiB},
         0, 0.1, True),
        # a balloon pushing an idle workload into swap: its pins displace exactly that swap: no
        ({"usage_bytes": 510 * MiB, "swap_used_bytes": 0}, {"usage_bytes": 510 * MiB, "swap_used_bytes": 40 * MiB},
         40, 0.1, False),
        # slow growth (10 MiB/s): left to the other signals
        ({"usage_bytes": 490 * MiB}, {"usage_bytes": 500 * MiB}, 0, 1.0, False),
        # too small to count
        ({"usage_bytes": 497 * MiB}, {"usage_bytes": 500 * MiB}, 0, 0.01, False),
    ],
    ids=["sudden-need", "room-left", "own-pins", "into-swap", "balloon-squeeze", "slow", "tiny"],
)
def test_workload_growth_table(previous, current, balloon_delta_mib, interval_s, fires):
    from guestagent.agent import workload_growth

    zero_file = {"active_file_bytes": 0, "inactive_file_bytes": 0}
    result = workload_growth(reading(**zero_file, **previous), reading(**zero_file, **current),
                             balloon_delta_mib * MiB, interval_s, CFG)
    assert (result is not None) == fires
    if result is not None:
        growth = current["usage_bytes"] - previous["usage_bytes"] + current.get("swap_used_bytes", 0) \
            - previous.get("swap_used_bytes", 0)
        assert result[1] >= growth - (512 * MiB - current["usage_bytes"])  # at least the shortfall now
