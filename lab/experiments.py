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

from hostd.host_actions import HostAction
from lab.cpuref import CpuReference
from lab.runner import LabOptions, _hostd_status, down, up
from lab.spec import parse_lab
from protocol.limits import PAGES_PER_MIB
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


def hostd_toml(host_memory_bytes: int, idle_tax: float, sample_period_s: float, balance_period_s: float,
               cgroups: dict[str, str] | None = None, vswap_mode: str = "limit",
               vswap_state_file: Path | None = None) -> str:
    """hostd for an experiment; with `cgroups` (vm → cgroup path below the hierarchy) hostd
    applies swap targets to those guests (host swap, `vswap_mode`)."""
    text = (f'host_memory_bytes = "{host_memory_bytes >> 20}MiB"\nidle_tax_ratio = {idle_tax}\n'
            f'sample_period_ms = "{sample_period_s:g}s"\nbalance_period_ms = "{balance_period_s:g}s"\n'
            'report_interval_ms = "1s"\nhttp_address = "off"\n')
    if not cgroups:
        return text + "vswap = false\n"
    text += f'vswap = true\nvswap_mode = "{vswap_mode}"\n'
    if vswap_state_file is not None:
        text += f'vswap_state_file = "{vswap_state_file}"\n'
    return text + "".join(f'\n[vms.{vm}]\ncgroup = "{path}"\n' for vm, path in cgroups.items())


def lab_cgroups(options: LabOptions, guests: Sequence[str]) -> dict[str, str]:
    """Where lab/runner.py puts each guest: below the lab's parent, relative to the hierarchy."""
    return {guest: f"{options.cgroup_name}/{guest}" for guest in guests}


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


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.mean(known) if known else None


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
                int(statistics.mean(s.balloon_bytes for s in rows)), _mean([s.touches_per_s for s in rows]),
                int(statistics.mean(s.host_swap_bytes for s in rows)), int(statistics.mean(s.swap_bytes for s in rows)),
                _mean([s.latency_p99_us for s in rows]), _mean([s.cpu_reference_per_s for s in rows])))
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


# ---- balloon vs host swap ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BalloonVsSwapSetup:
    """One guest with a hot and a cold set; `take_bytes` taken from it three ways: its balloon
    (the guest's kernel chooses what to give up), blind host swap (hostd chooses, at random)
    and a lowered limit (the host forces it, the guest's LRU chooses) — the last two with
    hostd's own host backend (hostd.reclaim.HostReclaimer), stepped as hostd steps."""

    memsz_bytes: int = 256 * MiB
    hot_bytes: int = 48 * MiB
    cold_bytes: int = 160 * MiB
    hot_fraction: float = 0.9
    take_bytes: int = 96 * MiB
    cold_kinds: tuple[str, ...] = ("anon", "file")
    methods: tuple[str, ...] = ("balloon", "blind", "limit")
    before_s: float = 10.0  # undisturbed, before anything is taken
    after_s: float = 30.0  # from the moment it starts being taken
    step_bytes: int = 64 << 20  # host swap moves the limit this much a second (hostd's vswap_step)
    repeats: int = 1  # runs of the whole sequence per cold kind (the host methods' order alternates)
    match_balloon: bool = True  # also take by host swap exactly what the balloon held ("-eq" rows)


@dataclass(frozen=True, slots=True)
class SwapSample:
    cold_kind: str
    method: str  # balloon, blind, limit; blind-eq / limit-eq: the amount the balloon held; "#N": run N
    t_s: float  # seconds since it started being taken (negative: before)
    touches_per_s: float | None
    latency_p99_us: float | None
    usage_bytes: int
    swap_bytes: int
    major_faults: int  # cumulative since the run's start: swap-ins and page-cache refaults
    balloon_bytes: int


SWAP_FIELDS = ("cold_kind", "method", "t_s", "touches_per_s", "latency_p99_us", "usage_bytes", "swap_bytes",
               "major_faults", "balloon_bytes")


def balloon_vs_swap_lab(setup: BalloonVsSwapSetup, cold_kind: str, python: str) -> str:
    command = [python, "-m", "lab.skewload", "--hot", f"{setup.hot_bytes >> 20}MiB", "--cold",
               f"{setup.cold_bytes >> 20}MiB", "--hot-fraction", f"{setup.hot_fraction:g}", "--cold-kind", cold_kind]
    return (f'[guests.skew]\nmemory = "{setup.memsz_bytes >> 20}MiB"\nswap = "{setup.memsz_bytes >> 20}MiB"\n'
            f"command = {json_list(command)}\n")


def json_list(words: Sequence[str]) -> str:
    import json

    return json.dumps(list(words))


@dataclass(frozen=True, slots=True)
class SwapSummary:
    cold_kind: str
    method: str
    before_touches_per_s: float | None
    dip_touches_per_s: float | None  # the worst second after it was taken
    after_touches_per_s: float | None  # the mean of the last half
    after_p99_us: float | None
    swapped_bytes: int  # swap in use at the end, less at the start
    major_faults: int  # during the run after it was taken: what the guest had to read back
    recovered_s: float | None  # first second after which throughput stays ≥ 80 % of the settled mean


def summarize_swap(samples: Sequence[SwapSample]) -> list[SwapSummary]:
    out = []
    for kind in dict.fromkeys(s.cold_kind for s in samples):
        for method in dict.fromkeys(s.method for s in samples if s.cold_kind == kind):
            rows = [s for s in samples if s.cold_kind == kind and s.method == method]
            before = [s for s in rows if s.t_s < 0]
            after = [s for s in rows if s.t_s >= 0]
            if not after:
                continue
            tail = after[len(after) // 2:]
            settled = _mean([s.touches_per_s for s in tail])
            recovered = None
            if settled:
                for index, s in enumerate(after):
                    if all((r.touches_per_s or 0) >= 0.8 * settled for r in after[index:]):
                        recovered = s.t_s
                        break
            rates = [s.touches_per_s for s in after if s.touches_per_s is not None]
            out.append(SwapSummary(
                kind, method, _mean([s.touches_per_s for s in before]), min(rates) if rates else None, settled,
                _mean([s.latency_p99_us for s in tail]),
                after[-1].swap_bytes - (before[-1].swap_bytes if before else 0),
                after[-1].major_faults - (before[-1].major_faults if before else 0), recovered))
    return out


def render_swap_table(summaries: Sequence[SwapSummary]) -> str:
    def rate(value: float | None) -> str:
        return f"{value:,.0f}" if value is not None else "-"

    lines = [f"{'COLD':<5} {'METHOD':<11} {'BEFORE/s':>10} {'WORST/s':>10} {'AFTER/s':>10} {'AFTER':>6} "
             f"{'P99 µs':>8} {'SWAPPED':>8} {'MAJFLT':>8} {'RECOVER':>7}"]
    for s in summaries:
        ratio = f"{s.after_touches_per_s / s.before_touches_per_s:.2f}" if s.after_touches_per_s and \
            s.before_touches_per_s else "-"
        p99 = f"{s.after_p99_us:,.1f}" if s.after_p99_us is not None else "-"
        recovered = f"{s.recovered_s:.0f}s" if s.recovered_s is not None else "-"
        lines.append(f"{s.cold_kind:<5} {s.method:<11} {rate(s.before_touches_per_s):>10} "
                     f"{rate(s.dip_touches_per_s):>10} {rate(s.after_touches_per_s):>10} {ratio:>6} {p99:>8} "
                     f"{format_bytes(max(0, s.swapped_bytes)):>8} {s.major_faults:>8,} {recovered:>7}")
    return "\n".join(lines)


def _take_by_host(reclaimer: Any, cgroup: str, goal_bytes: int, step_bytes: int, blind: bool,
                  usage_bytes: Callable[[], int]) -> bool:
    """One host-swap step toward `goal_bytes`, as hostd takes it (hostd.core.host_actions):
    from what the cgroup holds, at most a step; blind pages out first, then holds the limit.
    Returns True once at the goal."""
    usage = usage_bytes()
    current = reclaimer.last_limit.get(cgroup, usage)
    limit = max(goal_bytes, min(current, usage) - step_bytes)
    actions: list[HostAction] = []
    if blind and usage > limit:
        actions.append(HostAction("skew", cgroup, "pageout", usage - limit))
    actions.append(HostAction("skew", cgroup, "limit", limit))
    failures = reclaimer.apply(actions)
    if failures:
        raise RuntimeError(f"host swap failed: {failures}")
    reclaimer.last_limit[cgroup] = limit
    return bool(limit <= goal_bytes)


def balloon_held_bytes(samples: Sequence[SwapSample]) -> int:
    """What a balloon run settled at: the mean balloon of its last half, whole MiB (the amount
    the "-eq" host runs take, so that the three methods are compared at the same amount)."""
    after = [s for s in samples if s.t_s >= 0]
    tail = after[len(after) // 2:]
    return (int(statistics.mean(s.balloon_bytes for s in tail)) >> 20 << 20) if tail else 0


def swap_case_plan(setup: BalloonVsSwapSetup, repeat: int, held_bytes: int) -> list[tuple[str, str, int]]:
    """The host runs after balloon run `repeat`: (label, method, bytes taken). The order of the
    methods alternates between repeats: other jobs on the host change its speed over time."""
    host_methods = [m for m in setup.methods if m != "balloon"]
    if repeat % 2:
        host_methods.reverse()
    suffix = f"#{repeat + 1}" if setup.repeats > 1 else ""
    plan = [(f"{m}{suffix}", m, setup.take_bytes) for m in host_methods]
    if setup.match_balloon and 0 < held_bytes < setup.take_bytes:
        plan += [(f"{m}-eq{suffix}", m, held_bytes) for m in host_methods]
    return plan


def _run_swap_case(setup: BalloonVsSwapSetup, cold_kind: str, method: str, hostd_config: Path,
                   options: LabOptions, progress: Progress, take_bytes: int | None = None,
                   label: str | None = None) -> list[SwapSample]:
    take_bytes = setup.take_bytes if take_bytes is None else take_bytes
    label = method if label is None else label
    import json
    import sys

    from cgroups import memory_cgroup_version, memory_hierarchy
    from cgroups.reader import CgroupReader
    from hostd.cgroupfs import CgroupfsBackend
    from hostd.client import HostdClient
    from hostd.reclaim import HostReclaimer
    from protocol.limits import PAGE_SIZE_BYTES

    samples: list[SwapSample] = []
    reclaimer = None
    try:
        state = up(parse_lab(balloon_vs_swap_lab(setup, cold_kind, sys.executable), "balloon-vs-swap lab"),
                   hostd_config, options, lambda _line: None)
        path = Path(state["guests"]["skew"]["cgroup"])
        cgroup = str(path.relative_to(memory_hierarchy(memory_cgroup_version())))
        report = Path(state["guests"]["skew"]["workload_report"])
        reader = CgroupReader.for_path(path)
        reclaimer = HostReclaimer({"skew": cgroup}, options.state_dir / "vswap" / "record.json", CgroupfsBackend())
        reclaimer.last_limit = {}  # type: ignore[attr-defined]
        reclaimer.read("skew")
        deadline = time.monotonic() + 60
        while not report.exists():  # the workload has filled its sets
            if time.monotonic() > deadline:
                raise RuntimeError("the skew workload did not report within 60 s")
            time.sleep(0.5)
        time.sleep(2.0)
        faults0 = reader.read().major_faults or 0
        started = time.monotonic() + setup.before_s
        taken = False
        client = HostdClient(options.endpoints.control)
        last_ts = 0.0
        while time.monotonic() < started + setup.after_s:
            now = time.monotonic()
            if now >= started and not taken:
                if method == "balloon":
                    client.target("skew", take_bytes // PAGE_SIZE_BYTES)
                    taken = True
                else:
                    taken = _take_by_host(reclaimer, cgroup, setup.memsz_bytes - take_bytes, setup.step_bytes,
                                          method == "blind", lambda: reader.read().usage_bytes)
            time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
            reading = reader.read()
            try:
                workload = json.loads(report.read_text())
            except (OSError, ValueError):
                workload = {}
            fresh = workload.get("ts", 0) != last_ts
            last_ts = workload.get("ts", 0)
            snapshot = _hostd_status(options.endpoints.control) or {"vms": []}
            balloon = sum(vm["balloon_bytes"] for vm in snapshot["vms"] if vm["vm_id"] == "skew")
            samples.append(SwapSample(cold_kind, label, round(time.monotonic() - started, 2),
                                      workload.get("touches_per_s") if fresh else 0.0,
                                      workload.get("latency_p99_us") if fresh else None,
                                      reading.usage_bytes, reading.swap_used_bytes or 0,
                                      (reading.major_faults or 0) - faults0, balloon))
        if method != "balloon":
            progress(f"{cold_kind}/{label}: " + "; ".join(r.describe() for r in reclaimer.last_pageout.values()))
    finally:
        if reclaimer is not None:
            reclaimer.restore_all()
        down(options, lambda _line: None)
    return samples


def run_balloon_vs_swap(setup: BalloonVsSwapSetup, out_dir: Path, options: LabOptions,
                        progress: Progress = print) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    hostd_config = out_dir / "balloon-vs-swap.hostd.toml"
    # Memory enough for the guest (the policy never acts by itself; only the manual target
    # and the experiment's own host swap take memory), and no host swap of hostd's.
    hostd_config.write_text(hostd_toml(4 * setup.memsz_bytes, 0.75, 10, 5))
    samples: list[SwapSample] = []
    for kind in setup.cold_kinds:
        for repeat in range(setup.repeats):
            # The balloon first: the host methods then also take exactly what it held.
            label = f"balloon#{repeat + 1}" if setup.repeats > 1 else "balloon"
            progress(f"cold {kind}: asking {setup.take_bytes >> 20} MiB by balloon ({label})")
            ballooned = _run_swap_case(setup, kind, "balloon", hostd_config, options, progress, label=label)
            samples.extend(ballooned)
            held = balloon_held_bytes(ballooned)
            progress(f"cold {kind}: the balloon held {held >> 20} MiB")
            for label, method, take in swap_case_plan(setup, repeat, held):
                progress(f"cold {kind}: taking {take >> 20} MiB by {method} ({label})")
                samples.extend(_run_swap_case(setup, kind, method, hostd_config, options, progress, take, label))
    write_csv(out_dir / "balloon-vs-swap.csv", samples, SWAP_FIELDS)
    from lab.plots import plot_balloon_vs_swap

    plot_balloon_vs_swap(samples, out_dir / "balloon-vs-swap.png", setup)
    table = render_swap_table(summarize_swap(samples))
    (out_dir / "balloon-vs-swap.txt").write_text(table + "\n")
    return f"{table}\n\nwrote {out_dir / 'balloon-vs-swap.csv'}, {out_dir / 'balloon-vs-swap.png'}"


# ---- the working-set estimator's response (pure) ------------------------------------------------
@dataclass(frozen=True, slots=True)
class EstimatorSetup:
    """A workload whose true touched fraction steps from `low` to `high` and back; hostd's
    estimator (hostd.policy.WorkingSet) fed as hostd feeds it: each completed sampling period
    (with_period) and, every report in between, the running period's partial count
    (with_current). The workload touches its whole set within a second, so a partial count
    is the true fraction at once."""

    sample_periods_s: tuple[float, ...] = (5.0, 15.0, 60.0)
    low: float = 0.2
    high: float = 0.8
    step_up_s: float = 300.0
    step_down_s: float = 900.0
    end_s: float = 2700.0
    report_s: float = 1.0


@dataclass(frozen=True, slots=True)
class EstimatorSample:
    sample_period_s: float
    t_s: float
    true_ratio: float
    slow: float
    fast: float
    fast_current: float
    estimate: float


ESTIMATOR_FIELDS = ("sample_period_s", "t_s", "true_ratio", "slow", "fast", "fast_current", "estimate")


def true_touched(setup: EstimatorSetup, t_s: float) -> float:
    return setup.high if setup.step_up_s <= t_s < setup.step_down_s else setup.low


def estimator_response(setup: EstimatorSetup) -> list[EstimatorSample]:
    from hostd.policy import EwmaGains, WorkingSet

    gains = EwmaGains()
    out: list[EstimatorSample] = []
    for period in setup.sample_periods_s:
        ws = WorkingSet()
        period_start = 0.0
        peak = 0.0  # the period's touched fraction so far: what its pages' access bits show
        steps = round(setup.end_s / setup.report_s)
        for index in range(1, steps + 1):
            t = index * setup.report_s
            peak = max(peak, true_touched(setup, t - setup.report_s / 2))
            if t - period_start >= period - 1e-9:
                ws = ws.with_period(peak, gains)
                period_start, peak = t, 0.0
            elif ws.samples:
                ws = ws.with_current(peak, gains)
            out.append(EstimatorSample(period, t, true_touched(setup, t), ws.slow, ws.fast, ws.fast_current,
                                       ws.ratio))
    return out


@dataclass(frozen=True, slots=True)
class EstimatorSummary:
    sample_period_s: float
    up_90_s: float | None  # after the step up: until the estimate reaches 90 % of the way
    down_90_s: float | None  # after the step down: until it has come 90 % of the way down


def summarize_estimator(samples: Sequence[EstimatorSample], setup: EstimatorSetup) -> list[EstimatorSummary]:
    out = []
    span = setup.high - setup.low
    for period in dict.fromkeys(s.sample_period_s for s in samples):
        rows = [s for s in samples if s.sample_period_s == period]
        up = next((s.t_s - setup.step_up_s for s in rows
                   if setup.step_up_s <= s.t_s and s.estimate >= setup.low + 0.9 * span), None)
        down = next((s.t_s - setup.step_down_s for s in rows
                     if s.t_s >= setup.step_down_s and s.estimate <= setup.high - 0.9 * span), None)
        out.append(EstimatorSummary(period, up, down))
    return out


def render_estimator_table(summaries: Sequence[EstimatorSummary]) -> str:
    lines = [f"{'SAMPLE PERIOD':>13} {'UP 90 %':>9} {'(PERIODS)':>9} {'DOWN 90 %':>10} {'(PERIODS)':>9}"]
    def cell(value: float | None, period: float) -> tuple[str, str]:
        return (f"{value:.0f}s", f"{value / period:.1f}") if value is not None else ("never", "-")

    for s in summaries:
        up, down = cell(s.up_90_s, s.sample_period_s), cell(s.down_90_s, s.sample_period_s)
        lines.append(f"{s.sample_period_s:>12g}s {up[0]:>9} {up[1]:>9} {down[0]:>10} {down[1]:>9}")
    return "\n".join(lines)


def run_estimator(setup: EstimatorSetup, out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = estimator_response(setup)
    write_csv(out_dir / "wss-estimator.csv", samples, ESTIMATOR_FIELDS)
    from lab.plots import plot_estimator

    plot_estimator(samples, out_dir / "wss-estimator.png", setup)
    table = render_estimator_table(summarize_estimator(samples, setup))
    (out_dir / "wss-estimator.txt").write_text(table + "\n")
    return f"{table}\n\nwrote {out_dir / 'wss-estimator.csv'}, {out_dir / 'wss-estimator.png'}"
