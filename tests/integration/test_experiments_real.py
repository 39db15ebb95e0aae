"""The idle-tax experiment in a short form on real guests: the direction and rough size of the
shift when τ goes from 0 to 0.75, not exact numbers."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from lab.experiments import IdleTaxSetup, run_idle_tax
from lab.runner import LabOptions
from lab.spec import Endpoints
from tests.conftest import free_loopback_port, require_root, require_swap

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.swap, pytest.mark.timeout(600)]
MiB = 1 << 20


class CpuReference:
    """How fast this host runs a fixed piece of CPU work, sampled while an experiment runs: the
    baseline a throughput comparison between two phases needs on a shared machine, where other
    processes can take half the cores in one phase and none in the next. A 2 ms burst every
    250 ms (< 1 % of a core), its rate (bursts per wall second) kept with its monotonic time."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuReference:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            started = time.monotonic()
            total = 0
            for value in range(20_000):
                total += value * value
            self.samples.append((started, 1.0 / max(time.monotonic() - started, 1e-6)))

    def rate(self, start: float, end: float) -> float:
        """The median burst rate in [start, end) (monotonic seconds)."""
        rates = sorted(rate for at, rate in self.samples if start <= at < end)
        return rates[len(rates) // 2] if rates else float("nan")


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
    phase_starts: dict[str, float] = {}

    def progress(line: str) -> None:
        if line.startswith("τ = "):  # run_idle_tax announces each phase as it starts it
            phase_starts[line.split()[2]] = time.monotonic()
        print(line)

    phase_s = 50.0
    with CpuReference() as cpu:
        output = run_idle_tax(IdleTaxSetup(phase_s=phase_s, sample_period_s=2, vswap_mode="limit"), tmp_path / "out",
                              options, progress)
    print(output)
    with open(tmp_path / "out" / "idle-tax.csv") as written:
        rows = list(csv.DictReader(written))
    assert 'cgroup = "' in (tmp_path / "out" / "idle-tax.hostd.toml").read_text()  # hostd was given the guests
    assert {"host_swap_bytes", "latency_p99_us"} <= set(rows[0])

    def settled(vm_id: str, tax: str, field: str) -> float:
        phase = [r for r in rows if r["vm_id"] == vm_id and r["idle_tax"] == tax and r[field]]
        tail = phase[len(phase) // 2:]
        return sum(float(r[field]) for r in tail) / len(tail)

    # The direction (the other short test checks the size): under load the idle guest's slow EWMA
    # may still be decaying at the end of a 50 s phase.
    assert settled("active", "0.75", "alloc_target_bytes") > settled("active", "0.0", "alloc_target_bytes") + 4 * MiB
    raw_gain = settled("active", "0.75", "touches_per_s") / settled("active", "0.0", "touches_per_s") - 1
    # The CPU the host had to give in each phase's second half (the part `settled` averages):
    # the throughput ratio is divided by it, so a machine that got busier between the phases
    # does not read as a loss (seen in CI at load 13-30: raw -26 %).
    cpu_rates = {tax: cpu.rate(start + phase_s / 2, start + phase_s) for tax, start in phase_starts.items()}
    cpu_ratio = cpu_rates["0.75"] / cpu_rates["0"]
    gain = (raw_gain + 1) / cpu_ratio - 1
    squeezed = settled("active", "0.0", "host_swap_bytes")
    print(f"active throughput gain {gain:+.0%} (raw {raw_gain:+.0%}, host CPU τ=0.75 ÷ τ=0 {cpu_ratio:.2f}), "
          f"host swap at τ=0 {squeezed / MiB:.0f} MiB")
    if squeezed < 8 * MiB:
        pytest.xfail(f"no host swap of the active guest at τ=0 ({squeezed / MiB:.0f} MiB): the policy's swap "
                     f"target stayed 0 (gain {gain:+.0%})")
    assert gain > 0.10
