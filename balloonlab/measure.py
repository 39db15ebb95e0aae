"""Measuring a service and asserting on what ballooning did to it.

    baseline = measure(lambda: urlopen(url).read(), seconds=3)      # before the squeeze
    guest.squeeze(to="128MiB")
    squeezed = measure(lambda: urlopen(url).read(), seconds=3)
    assert_throughput_within(squeezed, baseline, factor=2)           # at least half as many ops/s
    assert_latency_within(squeezed, baseline, factor=5, percentile=99)
    assert_no_oom_kills(guest)

Every failure message says what was measured against what, and — when the guest belongs to
a lab whose timeline is saved (the pytest plugin does that) — where the timeline is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from balloonlab.guest import Guest
    from balloonlab.lab import Lab


class BalloonAssertionError(AssertionError):
    """An assertion of balloonlab's helpers failed."""


@dataclass(frozen=True, slots=True)
class Measurement:
    """Calls of one operation during a measurement window."""

    ok: int
    errors: int
    seconds: float
    latencies_s: tuple[float, ...]  # of the successful calls, sorted
    last_error: str = ""

    @property
    def ops_per_s(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def latency_s(self, percentile: float = 50) -> float:
        if not self.latencies_s:
            return float("inf")
        index = min(len(self.latencies_s) - 1, int(percentile / 100 * len(self.latencies_s)))
        return self.latencies_s[index]

    @property
    def p50_ms(self) -> float:
        return 1000 * self.latency_s(50)

    @property
    def p99_ms(self) -> float:
        return 1000 * self.latency_s(99)

    def __str__(self) -> str:
        return (f"{self.ops_per_s:,.1f} ops/s, p50 {self.p50_ms:.2f} ms, p99 {self.p99_ms:.2f} ms "
                f"({self.ok} ok, {self.errors} errors in {self.seconds:.1f} s)")


def measure(operation: Callable[[], Any], seconds: float = 3.0, max_calls: int = 1_000_000) -> Measurement:
    """Call `operation` back to back for `seconds`; an exception counts as an error."""
    latencies: list[float] = []
    errors = 0
    last_error = ""
    started = time.perf_counter()
    deadline = started + seconds
    calls = 0
    while time.perf_counter() < deadline and calls < max_calls:
        calls += 1
        before = time.perf_counter()
        try:
            operation()
        except Exception as exc:  # the service under test failing is a result
            errors += 1
            last_error = f"{type(exc).__name__}: {exc}"
            continue
        latencies.append(time.perf_counter() - before)
    return Measurement(len(latencies), errors, time.perf_counter() - started, tuple(sorted(latencies)), last_error)


def _where(lab: Lab | None) -> str:
    if lab is None:
        return ""
    path = getattr(lab, "timeline_path", None)
    return f" (timeline: {path})" if path else ""


def assert_no_oom_kills(*guests: Guest | Lab) -> None:
    """No OOM kill in any of these guests (a Lab: all its guests) since they were added."""
    from balloonlab.lab import Lab

    checked: list[Guest] = []
    for item in guests:
        checked.extend(item.guests.values() if isinstance(item, Lab) else [item])
    killed = [(guest, guest.facts().oom_kills) for guest in checked]
    bad = [f"{guest.vm_id}: {count}" for guest, count in killed if count]
    if bad:
        raise BalloonAssertionError(f"OOM kills: {', '.join(bad)}{_where(checked[0].lab if checked else None)}")


def assert_throughput_within(measured: Measurement, baseline: Measurement, factor: float,
                             guest: Guest | None = None) -> None:
    """measured ops/s ≥ baseline ops/s / factor."""
    if factor < 1:
        raise ValueError("factor must be ≥ 1")
    if measured.ops_per_s * factor < baseline.ops_per_s:
        raise BalloonAssertionError(
            f"throughput {measured.ops_per_s:,.1f} ops/s is below 1/{factor:g} of the baseline "
            f"{baseline.ops_per_s:,.1f} ops/s (measured: {measured}; baseline: {baseline})"
            f"{_where(guest.lab if guest else None)}")


def assert_latency_within(measured: Measurement, baseline: Measurement, factor: float, percentile: float = 99,
                          guest: Guest | None = None) -> None:
    """measured p-th percentile latency ≤ factor × the baseline's."""
    if factor < 1:
        raise ValueError("factor must be ≥ 1")
    got, base = measured.latency_s(percentile), baseline.latency_s(percentile)
    if got > factor * base:
        raise BalloonAssertionError(
            f"p{percentile:g} latency {1000 * got:.2f} ms is above {factor:g} × the baseline {1000 * base:.2f} ms "
            f"(measured: {measured}; baseline: {baseline}){_where(guest.lab if guest else None)}")


def assert_answering(measured: Measurement, max_error_ratio: float = 0.0, guest: Guest | None = None) -> None:
    """The service answered (errors at most this share of the calls)."""
    calls = measured.ok + measured.errors
    if calls == 0 or measured.errors > max_error_ratio * calls:
        raise BalloonAssertionError(
            f"{measured.errors} of {calls} calls failed (allowed {max_error_ratio:.0%}); last: {measured.last_error}"
            f"{_where(guest.lab if guest else None)}")
