"""The idle-tax experiment in a short form on real guests: the direction and rough size of the
shift when τ goes from 0 to 0.75, not exact numbers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lab.experiments import IdleTaxSetup, run_idle_tax
from lab.runner import LabOptions
from lab.spec import Endpoints
from tests.conftest import IN_CI, free_loopback_port, require_root, require_swap

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.swap, pytest.mark.timeout(600)]
MiB = 1 << 20


def test_short_idle_tax_experiment_moves_memory_to_the_active_guest(tmp_path: Path) -> None:
    require_root()
    require_swap(1 << 30)
    import csv

    options = LabOptions(state_dir=tmp_path / "state", cgroup_name="balloonlab-test-experiment",
                         endpoints=Endpoints(f"tcp://127.0.0.1:{free_loopback_port()}",
                                             f"tcp://127.0.0.1:{free_loopback_port()}"))
    output = run_idle_tax(IdleTaxSetup(phase_s=40, sample_period_s=2), tmp_path / "out", options, print)
    print(output)
    with open(tmp_path / "out" / "idle-tax.csv") as written:
        rows = list(csv.DictReader(written))
    assert (tmp_path / "out" / "idle-tax.png").stat().st_size > 10_000

    def settled_alloc_mib(vm_id: str, tax: str) -> float:
        phase = [r for r in rows if r["vm_id"] == vm_id and r["idle_tax"] == tax]
        tail = phase[3 * len(phase) // 4:]  # the idle guest's estimate decays slowly: the phase's last quarter
        return sum(int(r["alloc_target_bytes"]) for r in tail) / len(tail) / MiB

    even = {vm: settled_alloc_mib(vm, "0.0") for vm in ("idle", "active")}
    taxed = {vm: settled_alloc_mib(vm, "0.75") for vm in ("idle", "active")}
    print(f"τ=0: {even}; τ=0.75: {taxed}")
    # τ = 0: an even split within 15 %; τ = 0.75: the active guest gets at least 40 MiB more and
    # the idle one as much less (the paper: 180/180 → 109/251 MB)
    assert abs(even["idle"] - even["active"]) < 0.15 * (even["idle"] + even["active"]) / 2
    assert taxed["active"] > even["active"] + 40
    assert taxed["idle"] < even["idle"] - 40
    assert taxed["active"] > 1.6 * taxed["idle"]


def test_short_idle_tax_with_host_swap_the_active_workload_gains_throughput(tmp_path: Path) -> None:
    """Fig. 7 with its throughput effect, short (2 × 50 s, ≤ ~3 min): hostd has the guests'
    cgroups, so what the active guest's balloon cannot take at τ = 0 should become host swap,
    and its workload should run faster at τ = 0.75 (the paper: dbench +30 %). Checked: the
    direction, with a wide margin (+10 %). hostd now remembers a refusal until the balloon
    reaches its target, so the active guest is host-swapped at τ = 0 (14 MiB measured); if it
    is not (under 8 MiB), the throughput comparison means nothing and the test says so as an
    expected failure with the measured figures."""
    require_root()
    require_swap(1 << 30)
    import csv

    name = f"balloonlab-test-idletax-{os.getpid()}"
    options = LabOptions(state_dir=tmp_path / "state", cgroup_name=name,
                         endpoints=Endpoints(f"tcp://127.0.0.1:{free_loopback_port()}",
                                             f"tcp://127.0.0.1:{free_loopback_port()}"))
    phase_s = 50.0
    output = run_idle_tax(IdleTaxSetup(phase_s=phase_s, sample_period_s=2, vswap_mode="limit"), tmp_path / "out",
                          options)
    print(output)
    with open(tmp_path / "out" / "idle-tax.csv") as written:
        rows = list(csv.DictReader(written))
    assert 'cgroup = "' in (tmp_path / "out" / "idle-tax.hostd.toml").read_text()  # hostd was given the guests
    assert {"host_swap_bytes", "latency_p99_us", "cpu_reference_per_s"} <= set(rows[0])

    def settled(vm_id: str, tax: str, field: str) -> float:
        phase = [r for r in rows if r["vm_id"] == vm_id and r["idle_tax"] == tax and r[field]]
        tail = phase[len(phase) // 2:]
        return sum(float(r[field]) for r in tail) / len(tail)

    # The direction (the other short test checks the size): under load the idle guest's slow EWMA
    # may still be decaying at the end of a 50 s phase.
    assert settled("active", "0.75", "alloc_target_bytes") > settled("active", "0.0", "alloc_target_bytes") + 4 * MiB
    raw_gain = settled("active", "0.75", "touches_per_s") / settled("active", "0.0", "touches_per_s") - 1
    # The experiment samples the host's CPU speed beside each status (lab.cpuref): the throughput
    # ratio is divided by its ratio between the phases' settled halves, so a machine that got
    # busier between the phases does not read as a loss (seen in CI at load 13-30: raw -26 %).
    cpu_ratio = settled("active", "0.75", "cpu_reference_per_s") / settled("active", "0.0", "cpu_reference_per_s")
    gain = (raw_gain + 1) / cpu_ratio - 1
    squeezed = settled("active", "0.0", "host_swap_bytes")
    print(f"active throughput gain {gain:+.0%} (raw {raw_gain:+.0%}, host CPU τ=0.75 ÷ τ=0 {cpu_ratio:.2f}), "
          f"host swap at τ=0 {squeezed / MiB:.0f} MiB")
    if squeezed < 8 * MiB:
        reason = (f"no host swap of the active guest at τ=0 ({squeezed / MiB:.0f} MiB): the policy's swap "
                  f"target stayed 0 (gain {gain:+.0%})")
        if IN_CI:  # there a lost host swap is a regression, not an expected failure
            pytest.fail(reason)
        pytest.xfail(reason)
    assert gain > 0.10
