"""The workload's phase spec, parsed (pure: text in, phases out).

    active 300MiB for 60s, idle 120s, grow to 400MiB at 20MiB/s, active for 30s, repeat

Phases, comma-separated, run in order:

    active [SIZE] [for DURATION] [at RATE]   touch the working set over and over; SIZE sets it
                                             (it grows or shrinks to that size first); RATE caps
                                             touches (pages/s, e.g. "at 50000/s"); without a
                                             duration the phase never ends
    idle [DURATION]                          hold the working set without touching it
    grow to SIZE [at SIZE/s]                 grow the working set (default 32MiB/s), touching
                                             the new pages once; the phase ends at SIZE
    repeat                                   (last only) start again from the first phase

A phase without a duration that is not the last (or followed only by `repeat`) is refused:
it would never end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from protocol.units import parse_duration_ms, parse_size_bytes

PhaseKind = Literal["active", "idle", "grow"]
DEFAULT_GROW_BYTES_PER_S = 32 << 20


class PhaseSpecError(ValueError):
    """The spec's text is not understood; the message says which phase and why."""


@dataclass(frozen=True, slots=True)
class Phase:
    kind: PhaseKind
    size_bytes: int | None = None  # active: the working set (None: keep the current one); grow: the goal
    duration_ms: int | None = None  # None: until the size is reached (grow) or forever
    touch_pages_per_s: int | None = None  # active: None = as fast as possible
    grow_bytes_per_s: int = DEFAULT_GROW_BYTES_PER_S

    def describe(self) -> str:
        size = f" {self.size_bytes >> 20}MiB" if self.size_bytes is not None else ""
        duration = f" for {self.duration_ms / 1000:g}s" if self.duration_ms is not None else ""
        if self.kind == "grow":
            return f"grow to{size} at {self.grow_bytes_per_s >> 20}MiB/s"
        rate = f" at {self.touch_pages_per_s}/s" if self.touch_pages_per_s is not None else ""
        return f"{self.kind}{size}{duration}{rate}"


@dataclass(frozen=True, slots=True)
class PhasePlan:
    phases: tuple[Phase, ...]
    repeat: bool = False

    def max_size_bytes(self, initial_bytes: int) -> int:
        return max([initial_bytes, *(p.size_bytes for p in self.phases if p.size_bytes is not None)])


_ACTIVE = re.compile(r"^active(?:\s+(?P<size>[0-9.]+\s*[A-Za-z]*?))?(?:\s+for\s+(?P<dur>\S+))?"
                     r"(?:\s+at\s+(?P<rate>[0-9]+)\s*/\s*s)?$")
_IDLE = re.compile(r"^idle(?:\s+(?:for\s+)?(?P<dur>\S+))?$")
_GROW = re.compile(r"^grow\s+to\s+(?P<size>\S+)(?:\s+at\s+(?P<rate>\S+?)\s*/\s*s)?$")


def _size(text: str, where: str) -> int:
    try:
        value = parse_size_bytes(text.replace(" ", ""))
    except ValueError as exc:
        raise PhaseSpecError(f"{where}: {exc}") from None
    if value <= 0:
        raise PhaseSpecError(f"{where}: size must be positive")
    return value


def _duration(text: str, where: str) -> int:
    try:
        value = parse_duration_ms(text)
    except ValueError as exc:
        raise PhaseSpecError(f"{where}: {exc}") from None
    if value <= 0:
        raise PhaseSpecError(f"{where}: duration must be positive")
    return value


def parse_phases(text: str) -> PhasePlan:
    parts = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not part for part in parts):
        raise PhaseSpecError("empty phase in spec (phases are separated by commas)")
    repeat = parts[-1].lower() == "repeat"
    if repeat:
        parts = parts[:-1]
        if not parts:
            raise PhaseSpecError("'repeat' needs phases before it")
    phases: list[Phase] = []
    for index, part in enumerate(parts, 1):
        where = f"phase {index} ({part!r})"
        lowered = " ".join(part.lower().split())
        if match := _ACTIVE.match(lowered):
            rate = int(match["rate"]) if match["rate"] else None
            if rate is not None and rate <= 0:
                raise PhaseSpecError(f"{where}: touch rate must be positive")
            phases.append(Phase(
                "active", _size(match["size"], where) if match["size"] else None,
                _duration(match["dur"], where) if match["dur"] else None, rate))
        elif match := _IDLE.match(lowered):
            phases.append(Phase("idle", None, _duration(match["dur"], where) if match["dur"] else None))
        elif match := _GROW.match(lowered):
            grow_rate = _size(match["rate"], where) if match["rate"] else DEFAULT_GROW_BYTES_PER_S
            phases.append(Phase("grow", _size(match["size"], where), None, None, grow_rate))
        elif lowered == "repeat":
            raise PhaseSpecError(f"{where}: 'repeat' may only be the last word")
        else:
            raise PhaseSpecError(f"{where}: expected 'active [SIZE] [for DURATION] [at N/s]', "
                                 "'idle [DURATION]' or 'grow to SIZE [at SIZE/s]'")
    for index, phase in enumerate(phases[:-1], 1):
        if phase.kind != "grow" and phase.duration_ms is None:
            raise PhaseSpecError(f"phase {index} ({phase.describe()}) has no duration and would never end")
    if repeat and phases[-1].kind != "grow" and phases[-1].duration_ms is None:
        raise PhaseSpecError(f"the last phase ({phases[-1].describe()}) has no duration: 'repeat' would never come")
    return PhasePlan(tuple(phases), repeat)


@dataclass(frozen=True, slots=True)
class PhaseClock:
    """Which phase runs at a given time (pure). `started_ms` is when the current phase began."""

    index: int
    started_ms: int
    finished: bool = False


def advance(plan: PhasePlan, clock: PhaseClock, now_ms: int, size_bytes: int) -> PhaseClock:
    """Move to the next phase when the current one is over (its duration passed, or a grow
    phase reached its size). After the last phase: start over with `repeat`, else finished
    (the workload then holds its set idle)."""
    if clock.finished:
        return clock
    phase = plan.phases[clock.index]
    over = (phase.duration_ms is not None and now_ms - clock.started_ms >= phase.duration_ms) or (
        phase.kind == "grow" and phase.size_bytes is not None and size_bytes >= phase.size_bytes)
    if not over:
        return clock
    if clock.index + 1 < len(plan.phases):
        return PhaseClock(clock.index + 1, now_ms)
    if plan.repeat:
        return PhaseClock(0, now_ms)
    return PhaseClock(clock.index, now_ms, finished=True)
