"""A test's timeline: what every guest looked like, sampled while the test ran, and the
actions taken (squeeze, shares, τ ...), as JSON Lines, CSV and a PNG.

    timeline = lab.watch(interval=0.5)        # starts sampling in a background thread
    ...
    timeline.series("web", "balloon_bytes")   # [(t_s, value), ...]
    timeline.write_jsonl(path); timeline.write_csv(path); timeline.plot(path)
"""

from __future__ import annotations

import csv
import json
import threading
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class Sample:
    """One guest at one moment. Bytes unless named; counters are since the guest was added."""

    t_s: float
    vm_id: str
    alive: bool
    agent_state: str
    memsz_bytes: int
    balloon_bytes: int
    balloon_target_bytes: int
    alloc_target_bytes: int
    usage_bytes: int | None
    swap_bytes: int | None
    unevictable_bytes: int | None
    oom_kills: int | None
    major_faults: int | None
    refaults: int | None
    touches_per_s: float | None = None
    latency_p99_us: float | None = None
    extra: dict[str, float] = field(default_factory=dict)  # e.g. a scenario probe's answers

    def value(self, name: str) -> float | None:
        if name in self.extra:
            return self.extra[name]
        value = getattr(self, name, None)
        if isinstance(value, bool):
            return float(value)
        return float(value) if isinstance(value, int | float) else None


SAMPLE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Sample) if f.name != "extra")


@dataclass(frozen=True, slots=True)
class Event:
    t_s: float
    text: str


class Timeline:
    """Samples and events in time order; safe to append from the sampler thread while a test
    reads it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._samples: list[Sample] = []
        self._events: list[Event] = []

    def add(self, samples: Iterable[Sample]) -> None:
        with self._lock:
            self._samples.extend(samples)

    def mark(self, t_s: float, text: str) -> None:
        with self._lock:
            self._events.append(Event(round(t_s, 3), text))

    @property
    def samples(self) -> list[Sample]:
        with self._lock:
            return list(self._samples)

    @property
    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    @property
    def vm_ids(self) -> list[str]:
        return sorted({s.vm_id for s in self.samples})

    @property
    def duration_s(self) -> float:
        samples = self.samples
        return samples[-1].t_s - samples[0].t_s if samples else 0.0

    def series(self, vm_id: str, name: str) -> list[tuple[float, float]]:
        """(t_s, value) of one field of one guest, leaving out unknown values."""
        points = []
        for sample in self.samples:
            if sample.vm_id == vm_id:
                value = sample.value(name)
                if value is not None:
                    points.append((sample.t_s, value))
        return points

    def peak(self, vm_id: str, name: str) -> float | None:
        values = [value for _, value in self.series(vm_id, name)]
        return max(values) if values else None

    # ---- files -------------------------------------------------------------------------------
    def write_jsonl(self, path: Path) -> Path:
        """One JSON object a line: samples ({"t_s", "vm_id", ...}) and events ({"t_s", "event"})."""
        path.parent.mkdir(parents=True, exist_ok=True)
        rows: list[tuple[float, dict[str, Any]]] = [(s.t_s, asdict(s)) for s in self.samples]
        rows += [(e.t_s, {"t_s": e.t_s, "event": e.text}) for e in self.events]
        with open(path, "w") as out:
            for _, row in sorted(rows, key=lambda item: item[0]):
                out.write(json.dumps(row, separators=(",", ":")) + "\n")
        return path

    def write_csv(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        samples = self.samples
        extra = sorted({name for s in samples for name in s.extra})
        with open(path, "w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow([*SAMPLE_FIELDS, *extra])
            for s in samples:
                writer.writerow([getattr(s, name) for name in SAMPLE_FIELDS] + [s.extra.get(name) for name in extra])
        return path

    def plot(self, path: Path, title: str = "balloonlab timeline") -> bool:
        """A PNG of balloon, allocation target, usage and swap per guest, with the actions
        marked; False (and nothing written) when matplotlib is not installed."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        panels: Sequence[tuple[str, Sequence[str]]] = (
            ("balloon / target (MiB)", ("balloon_bytes", "alloc_target_bytes")),
            ("usage / swap (MiB)", ("usage_bytes", "swap_bytes")),
        )
        figure, axes = plt.subplots(len(panels), 1, figsize=(10, 6), sharex=True)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for axis, (label, names) in zip(axes, panels, strict=True):
            for index, vm_id in enumerate(self.vm_ids):
                for style, name in zip(("-", "--"), names, strict=True):
                    points = self.series(vm_id, name)
                    if points:
                        axis.plot([t for t, _ in points], [v / MiB for _, v in points], style,
                                  color=colors[index % len(colors)], label=f"{vm_id} {name.removesuffix('_bytes')}")
            for event in self.events:
                axis.axvline(event.t_s, color="grey", linewidth=0.6, alpha=0.6)
            axis.set_ylabel(label)
            axis.legend(fontsize=7, loc="upper left")
        for event in self.events:
            axes[0].annotate(event.text[:28], (event.t_s, 1), xycoords=("data", "axes fraction"), fontsize=6,
                             rotation=90, va="top", ha="right", color="grey")
        axes[-1].set_xlabel("time (s)")
        figure.suptitle(title)
        figure.tight_layout()
        figure.savefig(path, dpi=90)
        plt.close(figure)
        return True
