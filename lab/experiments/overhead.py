"""balloon-overhead (Fig. 2): a guest of `memsz` ballooned down to X against a guest configured
with X; the same workload in both; throughput compared. Ballooning should cost little."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lab.experiments.common import MiB, Progress, hostd_toml, write_csv
from lab.runner import LabOptions, _hostd_status, down, up
from lab.spec import parse_lab
from protocol.limits import PAGES_PER_MIB
from protocol.units import format_bytes


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
                raise RuntimeError(f"the balloon reached {held >> 20} MiB of {target_pages // PAGES_PER_MIB} MiB "
                                   "within 60 s (the agent refused the rest)")
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
