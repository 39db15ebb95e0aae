"""balloon-vs-swap: the seeds' claim that the balloon is preferred because the guest's own
kernel chooses the pages. One guest with a hot and a cold set (anonymous or page cache);
memory taken three ways — its balloon, blind host swap, a lowered limit — and, after each
balloon run, exactly what the balloon held taken by the two host methods as well."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hostd.host_actions import HostAction
from lab.experiments.common import MiB, Progress, hostd_toml, json_list, mean_known, write_csv
from lab.runner import LabOptions, _hostd_status, down, up
from lab.spec import parse_lab
from protocol.units import format_bytes


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
            settled = mean_known([s.touches_per_s for s in tail])
            recovered = None
            if settled:
                for index, s in enumerate(after):
                    if all((r.touches_per_s or 0) >= 0.8 * settled for r in after[index:]):
                        recovered = s.t_s
                        break
            rates = [s.touches_per_s for s in after if s.touches_per_s is not None]
            out.append(SwapSummary(
                kind, method, mean_known([s.touches_per_s for s in before]), min(rates) if rates else None, settled,
                mean_known([s.latency_p99_us for s in tail]),
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
