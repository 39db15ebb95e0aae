"""The experiments' pure parts: the labs they build and the summaries they print."""

import csv

import pytest

from lab.experiments import (
    CSV_FIELDS,
    IdleTaxSetup,
    OverheadPoint,
    OverheadSetup,
    Sample,
    hostd_toml,
    idle_tax_lab,
    overhead_lab,
    render_idle_tax_table,
    render_overhead_table,
    summarize,
    write_csv,
)
from lab.spec import parse_lab

MiB = 1 << 20


def test_the_idle_tax_lab_is_the_papers_two_256_mib_guests():
    spec = parse_lab(idle_tax_lab(IdleTaxSetup()))
    assert [(g.name, g.memory_bytes) for g in spec.guests] == [("idle", 256 * MiB), ("active", 256 * MiB)]
    assert spec.guests[0].phases.endswith("idle") and spec.guests[1].phases == "active 200MiB"


def test_the_overhead_labs_run_the_same_workload_in_a_ballooned_and_a_configured_guest():
    ballooned = parse_lab(overhead_lab(OverheadSetup(), "ballooned", 320 * MiB)).guests
    configured = parse_lab(overhead_lab(OverheadSetup(), "configured", 320 * MiB)).guests
    assert [(g.name, g.memory_bytes) for g in ballooned + configured] == [("ballooned", 512 * MiB),
                                                                         ("configured", 320 * MiB)]
    assert ballooned[0].phases == configured[0].phases == "active 160MiB"


def test_hostd_toml_is_valid_hostd_configuration(tmp_path):
    from hostd.config import load_config

    path = tmp_path / "hostd.toml"
    path.write_text(hostd_toml(360 * MiB, 0.75, 2, 1))
    config = load_config(["--config", str(path)], environ={})
    assert config.host_memory_bytes == 360 * MiB and config.idle_tax_ratio == 0.75
    assert config.sample_period_ms == 2000 and config.balance_period_ms == 1000


def sample(t, tax, vm, alloc_mib, touches=None):
    return Sample(t, tax, vm, alloc_mib * MiB, 0, 0.5, 0, touches)


def test_summaries_average_the_settled_second_half_of_each_phase():
    samples = [sample(t, 0.0, "active", 100 if t < 5 else 180, 1000.0) for t in range(10)]
    samples += [sample(t, 0.75, "active", 250, 2000.0) for t in range(10, 20)]
    summaries = summarize(samples)
    assert [(s.idle_tax, s.alloc_target_bytes // MiB, s.touches_per_s) for s in summaries] == [
        (0.0, 180, 1000.0), (0.75, 250, 2000.0)]
    table = render_idle_tax_table(summaries)
    assert "180MiB" in table and "2,000" in table


def test_overhead_table_and_csv(tmp_path):
    points = [OverheadPoint(320 * MiB, 950.0, 1000.0)]
    assert points[0].ratio == 0.95
    assert "0.950" in render_overhead_table(points)
    write_csv(tmp_path / "s.csv", [sample(0, 0.0, "idle", 10)], CSV_FIELDS)
    with open(tmp_path / "s.csv") as written:
        rows = list(csv.DictReader(written))
    assert rows[0]["vm_id"] == "idle" and int(rows[0]["alloc_target_bytes"]) == 10 * MiB


# ---- Fig. 7 with host swap, balloon vs swap, the estimator ----------------------------------
def test_hostd_toml_with_cgroups_gives_hostd_the_guests_for_host_swap(tmp_path):
    from hostd.config import load_config
    from lab.experiments import lab_cgroups
    from lab.runner import LabOptions

    cgroups = lab_cgroups(LabOptions(cgroup_name="exp-1"), ["idle", "active"])
    assert cgroups == {"idle": "exp-1/idle", "active": "exp-1/active"}
    path = tmp_path / "hostd.toml"
    path.write_text(hostd_toml(360 * MiB, 0.0, 3, 1, cgroups, "blind", tmp_path / "vswap" / "record.json"))
    config = load_config(["--config", str(path)], {})
    assert config.vswap and config.vswap_mode == "blind" and config.vm_cgroups == cgroups
    assert config.vswap_state_file == tmp_path / "vswap" / "record.json"
    path.write_text(hostd_toml(360 * MiB, 0.0, 3, 1))
    assert load_config(["--config", str(path)], {}).vswap is False  # no cgroups: no host swap


def test_the_idle_tax_table_sets_each_figure_beside_the_papers_and_the_throughput_gain():
    from lab.experiments import PhaseSummary, throughput_gain

    summaries = [PhaseSummary(0.0, "active", 169 * MiB, 6 * MiB, 2.0e6, 60 * MiB, 40 * MiB, 3.0),
                 PhaseSummary(0.0, "idle", 169 * MiB, 86 * MiB, None),
                 PhaseSummary(0.75, "active", 243 * MiB, 10 * MiB, 2.6e6, 0, 20 * MiB, 0.5),
                 PhaseSummary(0.75, "idle", 94 * MiB, 153 * MiB, None)]
    assert throughput_gain(summaries) == pytest.approx(0.3)
    table = render_idle_tax_table(summaries)
    assert "179MB" in table and "243MB" in table and "100MB" in table
    assert "+30%" in table and "paper: dbench +30%" in table
    assert "60MiB" in table  # host swap


@pytest.mark.parametrize(
    ("touches", "cpu", "raw", "adjusted"),
    [
        ((1e6, 1.3e6), (400.0, 400.0), 0.30, 0.30),   # the same CPU in both phases: nothing to divide out
        ((1e6, 1.3e6), (400.0, 200.0), 0.30, 1.60),   # half the CPU in the second phase: the memory did more
        ((1e6, 0.8e6), (400.0, 320.0), -0.20, 0.0),   # the loss was the host's, not the memory's
        ((1e6, 1.3e6), (None, 400.0), 0.30, None),    # no reference in a phase: no adjusted figure
    ],
)
def test_the_throughput_gain_is_adjusted_by_the_hosts_cpu_between_the_phases(touches, cpu, raw, adjusted):
    from lab.experiments import cpu_adjusted_gain, throughput_gain

    phases = ((0.0, touches[0], cpu[0], range(10)), (0.75, touches[1], cpu[1], range(10, 20)))
    rows = [Sample(t, tax, "active", 169 * MiB, 0, 1.0, 0, rate, cpu_reference_per_s=ref)
            for tax, rate, ref, times in phases for t in times]
    summaries = summarize(rows)
    assert throughput_gain(summaries) == pytest.approx(raw)
    assert cpu_adjusted_gain(summaries) == (None if adjusted is None else pytest.approx(adjusted))
    table = render_idle_tax_table(summaries)
    assert (f"CPU-adjusted {adjusted:+.0%}" in table) if adjusted is not None else "CPU-adjusted" not in table


def test_summaries_carry_host_swap_and_p99():
    rows = [Sample(t, 0.0, "active", 169 * MiB, 0, 1.0, 10 * MiB, 1e6, 2.0, 50 * MiB) for t in range(10)]
    [summary] = summarize(rows)
    assert summary.host_swap_bytes == 50 * MiB and summary.latency_p99_us == 2.0 and summary.swap_bytes == 10 * MiB


def test_the_balloon_vs_swap_lab_is_one_skewed_guest_with_a_cold_set_of_the_kind_asked():
    from lab.experiments import BalloonVsSwapSetup, balloon_vs_swap_lab

    [guest] = parse_lab(balloon_vs_swap_lab(BalloonVsSwapSetup(), "file", "/usr/bin/python3")).guests
    assert guest.name == "skew" and guest.memory_bytes == 256 * MiB and guest.phases == ""
    assert guest.command[:3] == ("/usr/bin/python3", "-m", "lab.skewload")
    assert guest.command[-2:] == ("--cold-kind", "file") and "0.9" in guest.command


def test_balloon_vs_swap_summaries_find_the_dip_the_settled_rate_and_the_traffic():
    from lab.experiments import SwapSample, render_swap_table, summarize_swap

    def s(t, rate, swap, faults):
        return SwapSample("anon", "blind", t, rate, 5.0, 100 * MiB, swap * MiB, faults, 0)

    rows = [s(-2, 1e6, 0, 0), s(-1, 1e6, 0, 0), s(0, 1e5, 30, 500), s(1, 3e5, 60, 900), s(2, 9e5, 60, 1000),
            s(3, 9e5, 60, 1000), s(4, 9e5, 60, 1000), s(5, 9e5, 60, 1000)]
    [summary] = summarize_swap(rows)
    assert summary.before_touches_per_s == 1e6 and summary.dip_touches_per_s == 1e5
    assert summary.after_touches_per_s == 9e5 and summary.recovered_s == 2
    assert summary.swapped_bytes == 60 * MiB and summary.major_faults == 1000
    assert "blind" in render_swap_table([summary]) and "0.90" in render_swap_table([summary])


def test_the_host_methods_also_take_exactly_what_the_balloon_held():
    from lab.experiments import BalloonVsSwapSetup, SwapSample, balloon_held_bytes, swap_case_plan

    def s(t, balloon_mib):
        return SwapSample("anon", "balloon", t, 1e6, 5.0, 100 * MiB, 0, 0, balloon_mib * MiB)

    # the balloon rose, the guest pressed back: what counts is where it settled (the last half)
    ballooned = [s(-1, 0), s(0, 0), s(1, 64), s(2, 96), s(3, 40), s(4, 17), s(5, 17), s(6, 18)]
    assert balloon_held_bytes(ballooned) == 23 * MiB  # mean of 40, 17, 17, 18 MiB, in whole MiB
    assert balloon_held_bytes([s(-1, 0)]) == 0
    one = BalloonVsSwapSetup(take_bytes=96 * MiB)
    assert swap_case_plan(one, 0, 17 * MiB) == [("blind", "blind", 96 * MiB), ("limit", "limit", 96 * MiB),
                                                ("blind-eq", "blind", 17 * MiB), ("limit-eq", "limit", 17 * MiB)]
    assert swap_case_plan(one, 0, 96 * MiB) == [("blind", "blind", 96 * MiB), ("limit", "limit", 96 * MiB)]
    assert swap_case_plan(one, 0, 0) == swap_case_plan(one, 0, 96 * MiB)  # nothing held: nothing to match
    three = BalloonVsSwapSetup(take_bytes=96 * MiB, repeats=3, match_balloon=False)
    assert swap_case_plan(three, 1, 17 * MiB) == [("limit#2", "limit", 96 * MiB), ("blind#2", "blind", 96 * MiB)]
    assert [label for label, _, _ in swap_case_plan(three, 2, 17 * MiB)] == ["blind#3", "limit#3"]


def test_the_estimator_goes_up_fast_and_down_slowly_in_sample_periods():
    from lab.experiments import EstimatorSetup, estimator_response, summarize_estimator

    setup = EstimatorSetup(sample_periods_s=(5.0, 20.0), step_up_s=100, step_down_s=400, end_s=1200)
    samples = estimator_response(setup)
    for row in samples:
        assert row.estimate == max(row.slow, row.fast, row.fast_current)
    by_period = {s.sample_period_s: s for s in summarize_estimator(samples, setup)}
    for period, summary in by_period.items():
        assert summary.up_90_s is not None and summary.down_90_s is not None
        assert summary.up_90_s <= 4 * period  # fast up: the fast EWMA and the running period's count
        assert summary.down_90_s >= 15 * period  # slow down: the slow EWMA holds the estimate up
        assert summary.down_90_s > 4 * summary.up_90_s
    assert by_period[20.0].up_90_s > by_period[5.0].up_90_s  # the period sets the time scale
    at_step = next(s for s in samples if s.sample_period_s == 20.0 and s.t_s == 102)
    assert at_step.fast_current > at_step.fast  # within the first period after the step already


def test_the_estimator_run_writes_its_csv_png_and_table(tmp_path):
    from lab.experiments import EstimatorSetup, run_estimator

    out = run_estimator(EstimatorSetup(sample_periods_s=(5.0,), step_up_s=50, step_down_s=150, end_s=400), tmp_path)
    assert "UP 90 %" in out and (tmp_path / "wss-estimator.png").stat().st_size > 10_000
    with open(tmp_path / "wss-estimator.csv") as written:
        assert len(list(csv.DictReader(written))) == 400
