"""PNG figures of the experiments (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lab.experiments import IdleTaxSetup, OverheadPoint, OverheadSetup, Sample

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
