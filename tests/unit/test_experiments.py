"""The experiments' pure parts: the labs they build and the summaries they print."""

import csv

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
