"""The workload's phase spec and phase clock (pure)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guestagent.phases import Phase, PhaseClock, PhasePlan, PhaseSpecError, advance, parse_phases

MiB = 1 << 20


@pytest.mark.parametrize(
    ("text", "phases", "repeat"),
    [
        ("active 300MiB for 60s, idle 120s, grow to 400MiB",
         [Phase("active", 300 * MiB, 60_000), Phase("idle", None, 120_000), Phase("grow", 400 * MiB)], False),
        ("active", [Phase("active")], False),
        ("idle", [Phase("idle")], False),
        ("active for 30s at 5000/s, idle for 5s, repeat",
         [Phase("active", None, 30_000, 5000), Phase("idle", None, 5_000)], True),
        ("grow to 1GiB at 64MiB/s", [Phase("grow", 1 << 30, grow_bytes_per_s=64 * MiB)], False),
        ("  Active 300 MiB  for 1m ,IDLE 2m", [Phase("active", 300 * MiB, 60_000), Phase("idle", None, 120_000)],
         False),
    ],
)
def test_parse_phases(text, phases, repeat):
    assert parse_phases(text) == PhasePlan(tuple(phases), repeat)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty phase"),
        ("active 10MiB for 5s,", "empty phase"),
        ("repeat", "needs phases"),
        ("sleep 5s", "expected 'active"),
        ("active 0MiB for 5s", "size must be positive"),
        ("active 10MiB for 0s", "duration must be positive"),
        ("idle, active", "would never end"),
        ("active 10MiB for 5s, idle, repeat", "'repeat' would never come"),
        ("repeat, idle 5s", "only be the last"),
        ("active 12 lemons for 5s", "phase 1"),
        ("active 10MiB for 5s at 0/s", "rate must be positive"),
    ],
)
def test_parse_phases_refuses_with_a_reason(text, message):
    with pytest.raises(PhaseSpecError, match=message):
        parse_phases(text)


def test_phase_clock_walks_durations_and_sizes_then_repeats_or_finishes():
    plan = parse_phases("active 10MiB for 5s, grow to 20MiB, idle 1s")
    clock = PhaseClock(0, 0)
    clock = advance(plan, clock, 4_999, 10 * MiB)
    assert clock == PhaseClock(0, 0)
    clock = advance(plan, clock, 5_000, 10 * MiB)
    assert clock == PhaseClock(1, 5_000)
    assert advance(plan, clock, 60_000, 19 * MiB) == clock  # grow ends at its size, not on time
    clock = advance(plan, clock, 7_000, 20 * MiB)
    assert clock == PhaseClock(2, 7_000)
    finished = advance(plan, clock, 8_000, 20 * MiB)
    assert finished.finished and advance(plan, finished, 99_000, 0) == finished
    looping = PhasePlan(plan.phases, repeat=True)
    assert advance(looping, clock, 8_000, 20 * MiB) == PhaseClock(0, 8_000)


@given(st.lists(st.tuples(st.sampled_from(["active", "idle"]), st.integers(1, 10_000)), min_size=1, max_size=6),
       st.integers(0, 100_000))
def test_phase_clock_never_skips_a_timed_phase(phases, horizon_ms):
    text = ", ".join(f"{kind} for {ms}ms" for kind, ms in phases) + ", repeat"
    plan = parse_phases(text)
    clock, now, visited = PhaseClock(0, 0), 0, [0]
    while now < horizon_ms:
        now += 500
        new = advance(plan, clock, now, 0)
        if new != clock:
            assert new.index == (clock.index + 1) % len(plan.phases)  # one step at a time, in order
            visited.append(new.index)
        clock = new
    assert not clock.finished
