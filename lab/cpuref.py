"""How fast this host runs a fixed piece of CPU work, sampled while an experiment runs.

A throughput comparison between two phases needs this baseline on a shared machine (a laptop,
a CI runner): other processes can take half the cores in one phase and none in the next, and
that reads as a gain or a loss of the workload's. A 2 ms burst every 250 ms (< 1 % of a core)
in a thread of the experiment's own process; each burst's rate (bursts per wall second) is
kept with its monotonic time. The experiment divides a throughput ratio by the ratio of these
rates over the same windows.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

BURST_PERIOD_S = 0.25
BURST_ITERATIONS = 20_000  # ~2 ms of Python arithmetic on this machine kind


class CpuReference:
    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []  # (monotonic s at the burst's start, bursts per s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-reference", daemon=True)

    def __enter__(self) -> CpuReference:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(BURST_PERIOD_S):
            started = time.monotonic()
            total = 0
            for value in range(BURST_ITERATIONS):
                total += value * value
            self.samples.append((started, 1.0 / max(time.monotonic() - started, 1e-6)))

    def rate(self, start: float, end: float) -> float | None:
        """The median burst rate in [start, end) (monotonic seconds); None without a burst there."""
        rates = sorted(rate for at, rate in self.samples if start <= at < end)
        return rates[len(rates) // 2] if rates else None
