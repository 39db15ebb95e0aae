"""PNG figures of the experiments (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hostd.timeline import Timeline
    from lab.experiments import (
        BalloonVsSwapSetup,
        EstimatorSample,
        EstimatorSetup,
        IdleTaxSetup,
        OverheadPoint,
        OverheadSetup,
        Sample,
        SwapSample,
    )

MiB = 1 << 20


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install 'balloonlab[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_idle_tax(samples: Sequence[Sample], path: Path, setup: IdleTaxSetup) -> None:
    plt = _pyplot()
    figure, (memory, throughput) = plt.subplots(2, 1, figsize=(8, 6), sharex=True,
                                                gridspec_kw={"height_ratios": [2, 1]})
    for vm_id in sorted({s.vm_id for s in samples}):
        rows = [s for s in samples if s.vm_id == vm_id]
        times = [s.t_s for s in rows]
        line = memory.plot(times, [s.alloc_target_bytes / MiB for s in rows], label=f"{vm_id} allocation target")[0]
        memory.plot(times, [(setup.memsz_bytes - s.balloon_bytes) / MiB for s in rows], linestyle="--",
                    color=line.get_color(), label=f"{vm_id} memsz − balloon")
        if any(s.host_swap_bytes for s in rows):  # what the balloon could not take, the host swapped (ESX)
            memory.plot(times, [(setup.memsz_bytes - s.balloon_bytes - (s.host_swap_bytes or 0)) / MiB for s in rows],
                        linestyle=":", color=line.get_color(), label=f"{vm_id} memsz − balloon − host swap")
        if vm_id == "active":
            throughput.plot(times, [(s.touches_per_s or 0) / 1e6 for s in rows], color=line.get_color())
    changes = [s.t_s for previous, s in pairwise(samples) if s.idle_tax != previous.idle_tax]
    for axis in (memory, throughput):
        for t in changes:
            axis.axvline(t, color="grey", linewidth=0.8)
    taxes = " → ".join(f"τ={t:g}" for t in setup.taxes)
    memory.set_title(f"Idle memory tax ({taxes}): two {setup.memsz_bytes >> 20} MiB guests, "
                     f"{setup.host_memory_bytes >> 20} MiB host")
    memory.set_ylabel("MiB")
    memory.legend(fontsize="small")
    throughput.set_ylabel("active touches (M/s)")
    throughput.set_xlabel("seconds")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_balloon_overhead(points: Sequence[OverheadPoint], path: Path, setup: OverheadSetup) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    sizes = sorted({p.size_bytes for p in points})
    for label, marker, field in (("configured at X", "o", "configured_touches_per_s"),
                                 (f"{setup.memsz_bytes >> 20} MiB ballooned down to X", "s",
                                  "ballooned_touches_per_s")):

        def rate(point: OverheadPoint, field: str = field) -> float:
            return float(getattr(point, field))

        # every run as a marker, the mean per size as the line (sizes may be repeated)
        means = [sum(rate(p) for p in points if p.size_bytes == size) /
                 sum(1 for p in points if p.size_bytes == size) / 1e6 for size in sizes]
        line = axis.plot([size / MiB for size in sizes], means, label=label)[0]
        axis.scatter([p.size_bytes / MiB for p in points], [rate(p) / 1e6 for p in points], marker=marker,
                     color=line.get_color())
    axis.set_xlabel("guest memory X (MiB)")
    axis.set_ylabel("workload touches (M/s)")
    axis.set_ylim(bottom=0)
    axis.set_title(f"Balloon overhead: {setup.workload_bytes >> 20} MiB active workload")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_timeline(timeline: Timeline, path: Path, title: str = "") -> int:
    """The dashboard's charts as a PNG: one panel per vm (memsz, granted, alloc target,
    balloon, active estimate, swap) and the host's free memory with the state thresholds.
    Returns how many series were drawn."""
    from hostd.timeline import THRESHOLDS, VM_SERIES

    plt = _pyplot()
    names = sorted(timeline.vms)
    figure, axes = plt.subplots(len(names) + 1, 1, figsize=(9, 2.4 * (len(names) + 1)), sharex=True, squeeze=False)
    drawn = 0
    styles = {"memsz": ":", "granted": "-", "alloc_target": "--", "balloon": "-", "active": "-.", "swap": "-"}
    for axis, vm_id in zip(axes[1:, 0], names, strict=True):
        for series in VM_SERIES:
            times, values = timeline.vms[vm_id][series]
            if times:
                axis.plot(times, [v / MiB for v in values], linestyle=styles[series], label=series)
                drawn += 1
        axis.set_ylabel(f"{vm_id} (MiB)")
        axis.legend(fontsize="x-small", ncol=len(VM_SERIES), loc="upper left")
    host = axes[0, 0]
    host.plot(timeline.times_s, [v / MiB for v in timeline.free], color="black", label="free")
    drawn += 1
    colours = {"high": "green", "soft": "gold", "hard": "darkorange", "low": "red"}
    for name in THRESHOLDS:
        host.plot(timeline.times_s, [v / MiB for v in timeline.thresholds[name]], color=colours[name],
                  linewidth=0.8, linestyle="--", label=name)
        drawn += 1
    host.set_ylabel("host free (MiB)")
    host.legend(fontsize="x-small", ncol=5, loc="upper left")
    if title:
        host.set_title(title)
    axes[-1, 0].set_xlabel("seconds since hostd started")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return drawn


def plot_balloon_vs_swap(samples: Sequence[SwapSample], path: Path, setup: BalloonVsSwapSetup) -> None:
    plt = _pyplot()
    kinds = list(dict.fromkeys(s.cold_kind for s in samples))
    figure, axes = plt.subplots(3, len(kinds), figsize=(6 * len(kinds), 8), sharex=True, squeeze=False)
    colors = {"balloon": "tab:green", "blind": "tab:red", "limit": "tab:blue"}
    for column, kind in enumerate(kinds):
        throughput, latency, faults = axes[0][column], axes[1][column], axes[2][column]
        for method in dict.fromkeys(s.method for s in samples if s.cold_kind == kind):
            rows = [s for s in samples if s.cold_kind == kind and s.method == method]
            times = [s.t_s for s in rows]
            color = colors.get(method)
            throughput.plot(times, [(s.touches_per_s or 0) / 1e6 for s in rows], color=color, label=method)
            latency.plot(times, [s.latency_p99_us or float("nan") for s in rows], color=color)
            faults.plot(times, [s.major_faults / 1e3 for s in rows], color=color)
            faults.plot(times, [s.swap_bytes / MiB / 10 for s in rows], color=color, linestyle=":")
        for axis in (throughput, latency, faults):
            axis.axvline(0, color="grey", linewidth=0.8)
        throughput.set_title(f"cold set: {'page cache (file)' if kind == 'file' else 'anonymous'}; "
                             f"{setup.take_bytes >> 20} MiB taken at t=0")
        throughput.set_ylabel("touches (M/s)")
        throughput.legend(fontsize="small")
        latency.set_ylabel("p99 µs per touch")
        latency.set_yscale("log")
        faults.set_ylabel("major faults (k, solid)\nswap in use (×10 MiB, dotted)")
        faults.set_xlabel("seconds")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_estimator(samples: Sequence[EstimatorSample], path: Path, setup: EstimatorSetup) -> None:
    plt = _pyplot()
    periods = list(dict.fromkeys(s.sample_period_s for s in samples))
    figure, axes = plt.subplots(len(periods), 1, figsize=(8, 2.6 * len(periods)), sharex=True, squeeze=False)
    for axis, period in zip((row[0] for row in axes), periods, strict=True):
        rows = [s for s in samples if s.sample_period_s == period]
        times = [s.t_s for s in rows]
        axis.plot(times, [s.true_ratio for s in rows], color="black", linewidth=2, label="true touched fraction")
        axis.plot(times, [s.slow for s in rows], label="slow EWMA")
        axis.plot(times, [s.fast for s in rows], label="fast EWMA")
        axis.plot(times, [s.fast_current for s in rows], linestyle=":", label="fast, current period")
        axis.plot(times, [s.estimate for s in rows], color="tab:red", linestyle="--", label="estimate (max)")
        axis.set_ylabel(f"period {period:g} s")
        axis.set_ylim(0, 1.05)
    axes[0][0].set_title(f"Working-set estimator: step {setup.low:g} → {setup.high:g} at {setup.step_up_s:g} s, "
                         f"back at {setup.step_down_s:g} s (fast up, slow down)")
    axes[0][0].legend(fontsize="x-small", loc="upper right")
    axes[-1][0].set_xlabel("seconds")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
