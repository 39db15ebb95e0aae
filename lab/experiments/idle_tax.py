"""idle-tax (Waldspurger 2002, Fig. 7): two guests with equal shares, one idle and one active,
share less host memory than they have. With τ = 0 the policy splits memory evenly; with
τ = 0.75 idle memory is taxed and moves to the active guest. hostd is given both guests'
cgroups, so what a balloon cannot take becomes host swap, as in ESX. Recorded: every vm's
allocation target, balloon and host swap over time, the active workload's throughput and p99,
and the host's CPU speed beside each sample (lab.cpuref)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.cpuref import CpuReference
from lab.experiments.common import MiB, Progress, hostd_toml, lab_cgroups, mean_known, write_csv
from lab.runner import LabOptions, _hostd_status, down, up
from lab.spec import parse_lab
from protocol.units import format_bytes


@dataclass(frozen=True, slots=True)
class IdleTaxSetup:
    memsz_bytes: int = 256 * MiB  # the paper: two 256 MB VMs...
    host_memory_bytes: int = 360 * MiB  # ...with 360 MB for both
    active_bytes: int = 200 * MiB
    idle_touched_bytes: int = 200 * MiB  # touched once at start (the OS zeroed it), then idle
    phase_s: float = 90.0  # how long each τ runs
    sample_period_s: float = 10.0
    taxes: tuple[float, float] = (0.0, 0.75)
    # As ESX: what the balloon cannot take becomes host swap (hostd is given the guests'
    # cgroups). "limit" lowers the cgroup's limit (the guest's LRU picks), "blind" pages out
    # random pages (hostd/pageout.py); "off" runs without host swap (the first version).
    vswap_mode: str = "limit"


def idle_tax_lab(setup: IdleTaxSetup) -> str:
    memsz = setup.memsz_bytes >> 20
    return (f'[guests.idle]\nmemory = "{memsz}MiB"\nswap = "{memsz}MiB"\n'
            f'phases = "grow to {setup.idle_touched_bytes >> 20}MiB at 256MiB/s, idle"\n\n'
            f'[guests.active]\nmemory = "{memsz}MiB"\nswap = "{memsz}MiB"\n'
            f'phases = "active {setup.active_bytes >> 20}MiB"\n')


@dataclass(frozen=True, slots=True)
class Sample:
    t_s: float
    idle_tax: float
    vm_id: str
    alloc_target_bytes: int
    balloon_bytes: int
    active_ratio: float
    swap_bytes: int
    touches_per_s: float | None
    latency_p99_us: float | None = None
    host_swap_bytes: int = 0  # how far hostd has lowered the guest's limit below its own (host swap)
    swap_out_pages: int | None = None  # the cgroup's cumulative pages swapped out (pswpout)
    swap_in_pages: int | None = None
    consumed_bytes: int = 0  # what the guest's cgroup holds (hostd's reading), balloon included
    host_state: str = ""  # hostd's free-memory state (host swap applies only outside "high")
    cpu_reference_per_s: float | None = None  # the host's CPU speed over the last second (lab.cpuref)


CSV_FIELDS = ("t_s", "idle_tax", "vm_id", "alloc_target_bytes", "balloon_bytes", "active_ratio", "swap_bytes",
              "touches_per_s", "latency_p99_us", "host_swap_bytes", "swap_out_pages", "swap_in_pages",
              "consumed_bytes", "host_state", "cpu_reference_per_s")


def host_swap_bytes(vm: dict[str, Any]) -> int:
    own, lowered = vm.get("cgroup_limit_bytes"), vm.get("vswap_limit_bytes")
    return max(0, own - lowered) if own is not None and lowered is not None else 0


def samples_from_snapshot(snapshot: dict[str, Any], t_s: float, idle_tax: float,
                          cpu_reference_per_s: float | None = None) -> list[Sample]:
    return [Sample(round(t_s, 2), idle_tax, vm["vm_id"], vm["alloc_target_bytes"], vm["balloon_bytes"],
                   round(vm["active_ratio"], 4), vm["swap_current_bytes"] or 0,
                   vm["workload"].get("touches_per_s"), vm["workload"].get("latency_p99_us"),
                   host_swap_bytes(vm), vm.get("swap_out_pages"), vm.get("swap_in_pages"),
                   vm.get("consumed_bytes") or 0, snapshot.get("host", {}).get("state", ""), cpu_reference_per_s)
            for vm in snapshot["vms"] if vm["alive"]]


@dataclass(frozen=True, slots=True)
class PhaseSummary:
    idle_tax: float
    vm_id: str
    alloc_target_bytes: int  # mean over the settled second half of the phase
    balloon_bytes: int
    touches_per_s: float | None
    host_swap_bytes: int = 0
    swap_bytes: int = 0
    latency_p99_us: float | None = None
    cpu_reference_per_s: float | None = None


def summarize(samples: Sequence[Sample]) -> list[PhaseSummary]:
    """Per τ and vm: the mean of the phase's second half (the first half is the transition)."""
    summaries = []
    for tax in sorted({s.idle_tax for s in samples}, key=[s.idle_tax for s in samples].index):
        phase = [s for s in samples if s.idle_tax == tax]
        start, end = phase[0].t_s, phase[-1].t_s
        settled = [s for s in phase if s.t_s >= (start + end) / 2]
        for vm_id in sorted({s.vm_id for s in settled}):
            rows = [s for s in settled if s.vm_id == vm_id]
            summaries.append(PhaseSummary(
                tax, vm_id, int(statistics.mean(s.alloc_target_bytes for s in rows)),
                int(statistics.mean(s.balloon_bytes for s in rows)), mean_known([s.touches_per_s for s in rows]),
                int(statistics.mean(s.host_swap_bytes for s in rows)), int(statistics.mean(s.swap_bytes for s in rows)),
                mean_known([s.latency_p99_us for s in rows]), mean_known([s.cpu_reference_per_s for s in rows])))
    return summaries


# The paper's Fig. 7 (W02 §5.4, read from the figure): allocations in MB, and dbench's gain.
PAPER_ALLOC_MB = {(0.0, "idle"): 179, (0.0, "active"): 179, (0.75, "idle"): 100, (0.75, "active"): 243}
PAPER_THROUGHPUT_GAIN = 0.30


def throughput_gain(summaries: Sequence[PhaseSummary], vm_id: str = "active") -> float | None:
    """The active workload's throughput in the last τ's phase over the first's, less 1."""
    rates = [s.touches_per_s for s in summaries if s.vm_id == vm_id]
    if len(rates) < 2 or not rates[0] or rates[-1] is None:
        return None
    return rates[-1] / rates[0] - 1


def host_cpu_ratio(summaries: Sequence[PhaseSummary], vm_id: str = "active") -> float | None:
    """The host's CPU speed (lab.cpuref) in the last τ's settled half over the first's."""
    rates = [s.cpu_reference_per_s for s in summaries if s.vm_id == vm_id]
    if len(rates) < 2 or not rates[0] or not rates[-1]:
        return None
    return rates[-1] / rates[0]


def cpu_adjusted_gain(summaries: Sequence[PhaseSummary], vm_id: str = "active") -> float | None:
    """throughput_gain with the host's CPU change between the phases divided out: on a shared
    machine a phase that got less CPU would otherwise read as the memory's loss."""
    gain, cpu = throughput_gain(summaries, vm_id), host_cpu_ratio(summaries, vm_id)
    return None if gain is None or cpu is None else (gain + 1) / cpu - 1


def render_idle_tax_table(summaries: Sequence[PhaseSummary]) -> str:
    lines = [f"{'τ':>5} {'VM':<7} {'ALLOC':>7} {'PAPER':>6} {'BALLOON':>8} {'HOST SWAP':>9} {'SWAP':>7} "
             f"{'TOUCHES/s':>11} {'P99 µs':>8}"]
    for s in summaries:
        touches = f"{s.touches_per_s:,.0f}" if s.touches_per_s is not None else "-"
        p99 = f"{s.latency_p99_us:,.1f}" if s.latency_p99_us is not None and s.touches_per_s else "-"
        paper = PAPER_ALLOC_MB.get((s.idle_tax, s.vm_id))
        lines.append(f"{s.idle_tax:>5g} {s.vm_id:<7} {format_bytes(s.alloc_target_bytes):>7} "
                     f"{f'{paper}MB' if paper else '-':>6} {format_bytes(s.balloon_bytes):>8} "
                     f"{format_bytes(s.host_swap_bytes):>9} {format_bytes(s.swap_bytes):>7} {touches:>11} {p99:>8}")
    gain, adjusted, cpu = throughput_gain(summaries), cpu_adjusted_gain(summaries), host_cpu_ratio(summaries)
    if gain is not None:
        cpu_note = f"; CPU-adjusted {adjusted:+.0%}, host CPU ×{cpu:.2f} between the phases" if adjusted is not None \
            and cpu is not None else ""
        lines.append(f"active throughput τ={summaries[0].idle_tax:g} → τ={summaries[-1].idle_tax:g}: {gain:+.0%}"
                     f"{cpu_note} (paper: dbench +{PAPER_THROUGHPUT_GAIN:.0%})")
    return "\n".join(lines)


# ---- I/O: running them --------------------------------------------------------------------------
def _set_idle_tax(endpoint: str, idle_tax: float) -> None:
    from hostd.client import HostdClient

    HostdClient(endpoint).set_host(idle_tax_ratio=idle_tax)


def run_idle_tax(setup: IdleTaxSetup, out_dir: Path, options: LabOptions, progress: Progress = print) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    hostd_config = out_dir / "idle-tax.hostd.toml"
    spec = parse_lab(idle_tax_lab(setup), "idle-tax lab")
    cgroups = None if setup.vswap_mode == "off" else lab_cgroups(options, [g.name for g in spec.guests])
    hostd_config.write_text(hostd_toml(setup.host_memory_bytes, setup.taxes[0], setup.sample_period_s,
                                       max(1.0, setup.sample_period_s / 4), cgroups, setup.vswap_mode,
                                       options.state_dir / "vswap" / "hostd-vswap.json"))
    samples: list[Sample] = []
    try:
        up(spec, hostd_config, options, progress)
        started = time.monotonic()
        with CpuReference() as cpu:
            for tax in setup.taxes:
                _set_idle_tax(options.endpoints.control, tax)
                progress(f"τ = {tax:g} for {setup.phase_s:g} s")
                phase_end = time.monotonic() + setup.phase_s
                while time.monotonic() < phase_end:
                    snapshot = _hostd_status(options.endpoints.control)
                    now = time.monotonic()
                    if snapshot:
                        samples.extend(samples_from_snapshot(snapshot, now - started, tax, cpu.rate(now - 1.0, now)))
                    time.sleep(1.0)
    finally:
        down(options, progress)
    write_csv(out_dir / "idle-tax.csv", samples, CSV_FIELDS)
    from lab.plots import plot_idle_tax

    plot_idle_tax(samples, out_dir / "idle-tax.png", setup)
    table = render_idle_tax_table(summarize(samples))
    (out_dir / "idle-tax.txt").write_text(table + "\n")
    return f"{table}\n\nwrote {out_dir / 'idle-tax.csv'}, {out_dir / 'idle-tax.png'}"
