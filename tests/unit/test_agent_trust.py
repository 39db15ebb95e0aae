"""What the agent takes from its host, and what it will not (review S19, S20; issue 13 item 4):
floors on the periods a welcome sets, absurd target-seq jumps, the pinned CURVE server key,
and the page arithmetic behind re-sending unlocks whose replies never came."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guestagent.agent import (
    MAX_TARGET_SEQ_JUMP,
    MIN_HOST_TIMEOUT_MS,
    MIN_REPORT_INTERVAL_MS,
    MIN_SAMPLE_PERIOD_MS,
    TARGET_SEQ_JUMP_PER_S,
    classify_target_seq,
    subtract_pages,
    welcome_timings,
)
from guestagent.config import AgentConfig, ConfigError, load_config
from guestagent.errors import AgentError
from protocol import PageRanges
from protocol.keys import generate_keypair


@pytest.mark.parametrize(
    ("report", "timeout", "sample", "expected", "floored"),
    [
        (1000, 5000, 10_000, (1000, 5000, 10_000), ()),  # hostd's own defaults: untouched
        (200, 1000, 1000, (200, 1000, 1000), ()),  # exactly the floors
        (199, 999, 999, (200, 1000, 1000), ("report_interval_ms", "host_timeout_ms", "sample_period_ms")),
        (10, 10, 100, (200, 1000, 1000), ("report_interval_ms", "host_timeout_ms", "sample_period_ms")),
        (10, 60_000, None, (200, 60_000, None), ("report_interval_ms",)),  # no sample period: keep ours
        (500, 300, 5000, (500, 1000, 5000), ("host_timeout_ms",)),
        # A bool, a string, a float, zero or a negative period never arrives since protocol v4:
        # welcome.sample_period_ms is a typed int 10..1 day (tests/unit/test_messages.py).
    ],
)
def test_welcome_periods_are_floored(report, timeout, sample, expected, floored):
    timings = welcome_timings(report, timeout, sample)
    assert (timings.report_interval_ms, timings.host_timeout_ms, timings.sample_period_ms) == expected
    assert timings.floored == floored


def test_floors_are_the_reviewed_values():
    assert (MIN_REPORT_INTERVAL_MS, MIN_HOST_TIMEOUT_MS, MIN_SAMPLE_PERIOD_MS) == (200, 1000, 1000)


@pytest.mark.parametrize(
    ("seq", "high_water", "since_ms", "verdict"),
    [
        (0, 0, 0, "stale"),  # no target set yet this session
        (0, 5, 0, "stale"),
        (4, 5, 0, "stale"),  # older than one already followed
        (5, 5, 0, "new"),  # lock/unlock replies repeat the current seq
        (6, 5, 0, "new"),
        (1, 0, 0, "new"),
        (2**62, 0, 0, "new"),  # the first seq of a session sets the mark (a long-running host)
        (5 + MAX_TARGET_SEQ_JUMP, 5, 0, "new"),
        (6 + MAX_TARGET_SEQ_JUMP, 5, 0, "absurd"),
        (2**63 - 1, 5, 0, "absurd"),  # the spoof from review S20
        (2**63 - 1, 5, 3_600_000, "absurd"),  # ...even an hour later
        (5 + MAX_TARGET_SEQ_JUMP + TARGET_SEQ_JUMP_PER_S * 10, 5, 10_000, "new"),  # others' targets ran the counter
        (6 + MAX_TARGET_SEQ_JUMP + TARGET_SEQ_JUMP_PER_S * 10, 5, 10_000, "absurd"),
        (6 + MAX_TARGET_SEQ_JUMP, 5, -50, "absurd"),  # a clock step back allows nothing extra
    ],
)
def test_target_seq_table(seq, high_water, since_ms, verdict):
    assert classify_target_seq(seq, high_water, since_ms) == verdict


def _ranges(*pairs: tuple[int, int]) -> PageRanges:
    return PageRanges.from_ranges(pairs)


@pytest.mark.parametrize(
    ("pages", "held", "left"),
    [
        ((), (), ()),
        (((0, 10),), (), ((0, 10),)),
        (((0, 10),), ((0, 10),), ()),
        (((0, 10),), ((3, 2),), ((0, 3), (5, 5))),
        (((0, 10),), ((0, 3), (8, 5)), ((3, 5),)),
        (((10, 10), (30, 10)), ((0, 5), (15, 20), (50, 1)), ((10, 5), (35, 5))),
        (((10, 10),), ((0, 10), (20, 10)), ((10, 10),)),  # adjacent, not overlapping
    ],
)
def test_subtract_pages_table(pages, held, left):
    assert subtract_pages(_ranges(*pages), _ranges(*held)) == _ranges(*left)


_range_lists = st.lists(st.tuples(st.integers(0, 300), st.integers(1, 40)), max_size=12)


@given(_range_lists, _range_lists)
def test_subtract_pages_is_set_difference(pages, held):
    a, b = PageRanges.from_ranges(pages), PageRanges.from_ranges(held)
    assert set(subtract_pages(a, b).iter_pages()) == set(a.iter_pages()) - set(b.iter_pages())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--curve-client-key", "agent.key_secret"], "curve-server-public-key"),
        (["--curve-server-public-key", "host.key"], "curve-client-key"),
    ],
)
def test_curve_without_the_pinned_host_key_refuses_to_start(argv, message):
    with pytest.raises(ConfigError, match=message) as raised:
        load_config(["--vm-id", "a", *argv], {})
    assert "pinned" in str(raised.value) or "key_secret" in str(raised.value)


def test_curve_key_files_are_checked_at_start(tmp_path: Path):
    from guestagent.client import AgentLoop

    host_public, _host_secret = generate_keypair(tmp_path, "host")
    agent_public, agent_secret = generate_keypair(tmp_path, "agent")
    good = AgentConfig(vm_id="a", curve_client_key=agent_secret, curve_server_public_key=host_public)
    keys = AgentLoop._load_curve_keys(good)
    assert keys is not None and all(len(key) == 40 for key in keys)
    assert AgentLoop._load_curve_keys(AgentConfig(vm_id="a")) is None
    for cfg, message in (
        (AgentConfig(vm_id="a", curve_client_key=agent_secret, curve_server_public_key=tmp_path / "gone.key"),
         "not found"),
        (AgentConfig(vm_id="a", curve_client_key=agent_public, curve_server_public_key=host_public), "no secret key"),
    ):
        with pytest.raises(AgentError, match=message):
            AgentLoop._load_curve_keys(cfg)


_PRESENT_EXCLUSIVE = (1 << 63) | (1 << 56)


@given(st.lists(st.integers(0, 5000), unique=True, max_size=600))
def test_pagemap_runs_are_the_sorted_frames(frames):
    from array import array

    from guestagent.balloon import ranges_from_pagemap

    entries = array("Q", [_PRESENT_EXCLUSIVE | frame for frame in frames])
    assert ranges_from_pagemap(entries) == PageRanges.from_pages(frames)
