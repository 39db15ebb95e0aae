"""Timeline records from snapshots, read back, and plotted."""

import json

import pytest

from hostd.timeline import TimelineError, event_record, read_timeline, sample_record

MiB = 1 << 20


def snapshot(uptime_ms, vms):
    return {"host": {"uptime_ms": uptime_ms, "state": "soft", "free_bytes": 50 * MiB, "host_memory_bytes": 1 << 30,
                     "thresholds_bytes": {"high": 61 * MiB, "soft": 41 * MiB, "hard": 20 * MiB, "low": 10 * MiB}},
            "vms": [{"vm_id": vm_id, "alive": alive, "memsz_bytes": 512 * MiB, "granted_bytes": 300 * MiB,
                     "alloc_target_bytes": 350 * MiB, "balloon_bytes": 100 * MiB, "active_bytes": 200 * MiB,
                     "swap_current_bytes": None} for vm_id, alive in vms]}


def lines():
    records = [sample_record(snapshot(1000, [("web", True), ("gone", False)])),
               event_record({"t_ms": 1500, "event": "target", "vm": "web"}),
               {"kind": "from-the-future", "t_s": 1.7},
               sample_record(snapshot(2000, [("web", True), ("db", True)]))]
    return [json.dumps(record) for record in records]


def test_samples_and_events_round_trip():
    timeline = read_timeline(lines())
    assert timeline.times_s == [1.0, 2.0]
    assert sorted(timeline.vms) == ["db", "web"]  # a dead vm is not sampled
    times, values = timeline.vms["web"]["balloon"]
    assert times == [1.0, 2.0] and values == [100 * MiB, 100 * MiB]
    assert timeline.vms["db"]["balloon"][0] == [2.0]  # joined late
    assert timeline.vms["web"]["swap"] == ([], [])  # unknown values are gaps, not zeros
    assert timeline.thresholds["high"] == [61 * MiB, 61 * MiB]
    assert [e["event"] for e in timeline.events] == ["target"] and timeline.events[0]["t_s"] == 1.5


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", ":1: not a timeline record"),
    ('{"kind": "sample", "t_s": 1, "host": {}}', ":1: malformed sample"),
    ('{"kind": "event", "t_s": 1, "event": "x"}', "no samples"),
    ("", "no samples"),
])
def test_bad_timelines_are_refused_with_the_line(text, message):
    with pytest.raises(TimelineError, match=message):
        read_timeline(text.splitlines(), "t.jsonl")


def test_plot_draws_six_series_per_vm_plus_free_memory_and_four_thresholds(tmp_path):
    from lab.plots import plot_timeline

    path = tmp_path / "t.png"
    # web: 5 known series (swap unknown), db: 5 → 10, host: free + 4 thresholds
    assert plot_timeline(read_timeline(lines()), path) == 15
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
