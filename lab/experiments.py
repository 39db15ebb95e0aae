"""The paper's experiments on real guests (`balloonctl experiment ...`).

idle-tax (Waldspurger 2002, Fig. 7): two guests with equal shares, one idle and one active,
share less host memory than they have. With τ = 0 the policy splits memory evenly; with
τ = 0.75 idle memory is taxed and moves to the active guest. Recorded: every vm's allocation
target and balloon over time, and the active workload's throughput in each half.

balloon-overhead (Fig. 2): a guest of `memsz` ballooned down to X against a guest configured
with X; the same workload in both; throughput compared. Ballooning should cost little.

Each run writes a CSV of every sample, a PNG and prints a table. The pure parts (lab files,
summaries) are separate from the run loops, which drive a real lab (lab/runner.py)."""

from __future__ import annotations

import csv
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.runner import LabOptions, _hostd_status, down, up
from lab.spec import parse_lab
from protocol.units import format_bytes

MiB = 1 << 20
Progress = Callable[[str], None]


# ---- pure: configurations and summaries -------------------------------------------------------
@dataclass(frozen=True, slots=True)
class IdleTaxSetup:
    memsz_bytes: int = 256 * MiB  # the paper: two 256 MB VMs...
    host_memory_bytes: int = 360 * MiB  # ...with 360 MB for both
    active_bytes: int = 200 * MiB
    idle_touched_bytes: int = 200 * MiB  # touched once at start (the OS zeroed it), then idle
    phase_s: float = 90.0  # how long each τ runs
    sample_period_s: float = 10.0
    taxes: tuple[float, float] = (0.0, 0.75)


def idle_tax_lab(setup: IdleTaxSetup) -> str:
    memsz = setup.memsz_bytes >> 20
    return (f'[guests.idle]\nmemory = "{memsz}MiB"\nswap = "{memsz}MiB"\n'
            f'phases = "grow to {setup.idle_touched_bytes >> 20}MiB at 256MiB/s, idle"\n\n'
            f'[guests.active]\nmemory = "{memsz}MiB"\nswap = "{memsz}MiB"\n'
            f'phases = "active {setup.active_bytes >> 20}MiB"\n')


def hostd_toml(host_memory_bytes: int, idle_tax: float, sample_period_s: float, balance_period_s: float) -> str:
    return (f'host_memory_bytes = "{host_memory_bytes >> 20}MiB"\nidle_tax_ratio = {idle_tax}\n'
            f'sample_period_ms = "{sample_period_s:g}s"\nbalance_period_ms = "{balance_period_s:g}s"\n'
            'report_interval_ms = "1s"\nhttp_address = "off"\n')


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


CSV_FIELDS = ("t_s", "idle_tax", "vm_id", "alloc_target_bytes", "balloon_bytes", "active_ratio", "swap_bytes",
              "touches_per_s")


def samples_from_snapshot(snapshot: dict[str, Any], t_s: float, idle_tax: float) -> list[Sample]:
    return [Sample(round(t_s, 2), idle_tax, vm["vm_id"], vm["alloc_target_bytes"], vm["balloon_bytes"],
                   round(vm["active_ratio"], 4), vm["swap_current_bytes"] or 0,
                   vm["workload"].get("touches_per_s"))
            for vm in snapshot["vms"] if vm["alive"]]


@dataclass(frozen=True, slots=True)
class PhaseSummary:
    idle_tax: float
    vm_id: str
    alloc_target_bytes: int  # mean over the settled second half of the phase
    balloon_bytes: int
    touches_per_s: float | None


def summarize(samples: Sequence[Sample]) -> list[PhaseSummary]:
    """Per τ and vm: the mean of the phase's second half (the first half is the transition)."""
    summaries = []
    for tax in sorted({s.idle_tax for s in samples}, key=[s.idle_tax for s in samples].index):
        phase = [s for s in samples if s.idle_tax == tax]
        start, end = phase[0].t_s, phase[-1].t_s
        settled = [s for s in phase if s.t_s >= (start + end) / 2]
        for vm_id in sorted({s.vm_id for s in settled}):
            rows = [s for s in settled if s.vm_id == vm_id]
            touches = [s.touches_per_s for s in rows if s.touches_per_s is not None]
            summaries.append(PhaseSummary(tax, vm_id, int(statistics.mean(s.alloc_target_bytes for s in rows)),
                                          int(statistics.mean(s.balloon_bytes for s in rows)),
                                          statistics.mean(touches) if touches else None))
    return summaries


def render_idle_tax_table(summaries: Sequence[PhaseSummary]) -> str:
    lines = [f"{'τ':>5} {'VM':<8} {'ALLOC TARGET':>12} {'BALLOON':>9} {'TOUCHES/s':>11}"]
    for s in summaries:
        touches = f"{s.touches_per_s:,.0f}" if s.touches_per_s is not None else "-"
        lines.append(f"{s.idle_tax:>5g} {s.vm_id:<8} {format_bytes(s.alloc_target_bytes):>12} "
                     f"{format_bytes(s.balloon_bytes):>9} {touches:>11}")
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[Any], fields: Sequence[str]) -> None:
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(fields)
        for row in rows:
            writer.writerow([getattr(row, name) for name in fields])


# ---- I/O: running them --------------------------------------------------------------------------
def _set_idle_tax(endpoint: str, idle_tax: float) -> None:
    from hostd.client import HostdClient

    HostdClient(endpoint).set_host(idle_tax_ratio=idle_tax)


def run_idle_tax(setup: IdleTaxSetup, out_dir: Path, options: LabOptions, progress: Progress = print) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    hostd_config = out_dir / "idle-tax.hostd.toml"
    hostd_config.write_text(hostd_toml(setup.host_memory_bytes, setup.taxes[0], setup.sample_period_s,
                                       max(1.0, setup.sample_period_s / 4)))
    samples: list[Sample] = []
    try:
        up(parse_lab(idle_tax_lab(setup), "idle-tax lab"), hostd_config, options, progress)
        started = time.monotonic()
        for tax in setup.taxes:
            _set_idle_tax(options.endpoints.control, tax)
            progress(f"τ = {tax:g} for {setup.phase_s:g} s")
            phase_end = time.monotonic() + setup.phase_s
            while time.monotonic() < phase_end:
                snapshot = _hostd_status(options.endpoints.control)
                if snapshot:
                    samples.extend(samples_from_snapshot(snapshot, time.monotonic() - started, tax))
                time.sleep(1.0)
    finally:
        down(options, progress)
    write_csv(out_dir / "idle-tax.csv", samples, CSV_FIELDS)
    from lab.plots import plot_idle_tax

    plot_idle_tax(samples, out_dir / "idle-tax.png", setup)
    table = render_idle_tax_table(summarize(samples))
    (out_dir / "idle-tax.txt").write_text(table + "\n")
    return f"{table}\n\nwrote {out_dir / 'idle-tax.csv'}, {out_dir / 'idle-tax.png'}"


@dataclass(frozen=True, slots=True)
class OverheadSetup:
    memsz_bytes: int = 512 * MiB
    sizes_bytes: tuple[int, ...] = (448 * MiB, 384 * MiB, 320 * MiB, 256 * MiB)
    workload_bytes: int = 160 * MiB
    settle_s: float = 5.0  # after the balloon reaches its target
    measure_s: float = 10.0


@dataclass(frozen=True, slots=True)
class OverheadPoint:
    size_bytes: int
    ballooned_touches_per_s: float
    configured_touches_per_s: float

    @property
    def ratio(self) -> float:
        return self.ballooned_touches_per_s / self.configured_touches_per_s if self.configured_touches_per_s else 0.0


OVERHEAD_FIELDS = ("size_bytes", "ballooned_touches_per_s", "configured_touches_per_s", "ratio")


def overhead_lab(setup: OverheadSetup, role: str, size_bytes: int) -> str:
    """One guest per run (two workloads on a 2-core host would measure each other):
    `ballooned` has memsz and is ballooned down to size; `configured` has size."""
    memory = setup.memsz_bytes if role == "ballooned" else size_bytes
    return (f'[guests.{role}]\nmemory = "{memory >> 20}MiB"\nswap = "256MiB"\n'
            f'phases = "active {setup.workload_bytes >> 20}MiB"\n')


def render_overhead_table(points: Sequence[OverheadPoint]) -> str:
    lines = [f"{'SIZE':>8} {'BALLOONED TOUCHES/s':>20} {'CONFIGURED TOUCHES/s':>21} {'RATIO':>6}"]
    for p in points:
        lines.append(f"{format_bytes(p.size_bytes):>8} {p.ballooned_touches_per_s:>20,.0f} "
                     f"{p.configured_touches_per_s:>21,.0f} {p.ratio:>6.3f}")
    return "\n".join(lines)


def _measure_guest(setup: OverheadSetup, role: str, size_bytes: int, hostd_config: Path, options: LabOptions,
                   progress: Progress) -> float:
    """Mean touches/s of one guest's workload once its balloon is where the run wants it."""
    from hostd.client import HostdClient
    from protocol.limits import PAGE_SIZE_BYTES

    try:
        up(parse_lab(overhead_lab(setup, role, size_bytes), f"balloon-overhead lab ({role})"), hostd_config,
           options, progress)
        target_pages = (setup.memsz_bytes - size_bytes) // PAGE_SIZE_BYTES if role == "ballooned" else 0
        HostdClient(options.endpoints.control).target(role, target_pages)
        deadline = time.monotonic() + 60
        while True:
            snapshot = _hostd_status(options.endpoints.control) or {"vms": []}
            held = sum(vm["balloon_bytes"] for vm in snapshot["vms"] if vm["vm_id"] == role)
            if held >= target_pages * PAGE_SIZE_BYTES and snapshot["vms"]:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the balloon reached {held >> 20} MiB of {target_pages >> 8} MiB within 60 s "
                                   "(the agent refused the rest)")
            time.sleep(0.5)
        time.sleep(setup.settle_s)
        rates: list[float] = []
        measure_end = time.monotonic() + setup.measure_s
        while time.monotonic() < measure_end:
            time.sleep(1.0)
            for vm in (_hostd_status(options.endpoints.control) or {"vms": []})["vms"]:
                rate = vm["workload"].get("touches_per_s")
                if vm["vm_id"] == role and rate:
                    rates.append(rate)
        if not rates:
            raise RuntimeError(f"the {role} guest's workload reported no throughput")
        return statistics.mean(rates)
    finally:
        down(options, lambda _line: None)


def run_balloon_overhead(setup: OverheadSetup, out_dir: Path, options: LabOptions,
                         progress: Progress = print) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    hostd_config = out_dir / "balloon-overhead.hostd.toml"
    # Memory enough for every guest: only the manual target moves the balloon.
    hostd_config.write_text(hostd_toml(4 * setup.memsz_bytes, 0.75, 10, 5))
    points = []
    for index, size in enumerate(setup.sizes_bytes):
        # Alternate which runs first: on a host that backs memory lazily (a VM) the first run
        # after a while is slower (seen: the first-run guest 3-8 % slower at every size).
        rates = {}
        for role in ("configured", "ballooned")[::1 if index % 2 == 0 else -1]:
            rates[role] = _measure_guest(setup, role, size, hostd_config, options, progress)
        configured, ballooned = rates["configured"], rates["ballooned"]
        point = OverheadPoint(size, ballooned, configured)
        progress(f"{size >> 20} MiB: ballooned {ballooned:,.0f}/s, configured {configured:,.0f}/s "
                 f"(ratio {point.ratio:.3f})")
        points.append(point)
    write_csv(out_dir / "balloon-overhead.csv", points, OVERHEAD_FIELDS)
    from lab.plots import plot_balloon_overhead

    plot_balloon_overhead(points, out_dir / "balloon-overhead.png", setup)
    table = render_overhead_table(points)
    (out_dir / "balloon-overhead.txt").write_text(table + "\n")
    return f"{table}\n\nwrote {out_dir / 'balloon-overhead.csv'}, {out_dir / 'balloon-overhead.png'}"
