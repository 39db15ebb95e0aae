"""hostd/eventlog.py: strict JSON lines, the size cap with rotation, and printable() for
peer text on its way into the log (review S15, S21)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from hostd.eventlog import EventLog, JsonLinesFile, TimelineFile, printable
from tests.unit.test_jsonout import strict_loads


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_event_log_writes_strict_json_with_session_and_time(tmp_path):
    path = tmp_path / "logs" / "events.jsonl"
    events = EventLog(path, "h-1234")
    events.write([{"event": "target", "vm": "web", "rho": float("inf")}, {"event": "join", "vm": "db"}])
    events.close()
    records = [strict_loads(line) for line in lines(path)]
    assert [r["event"] for r in records] == ["target", "join"]
    assert records[0]["rho"] is None and records[0]["session"] == "h-1234" and records[0]["ts"] > 0


def test_event_log_without_a_file_only_logs(caplog):
    caplog.set_level(logging.DEBUG, "hostd.eventlog")
    events = EventLog(None, "h-1")
    events.write([{"event": "join", "vm": "db", "rho": float("nan")}])
    events.close()
    assert '"rho":null' in caplog.text


def test_timeline_writes_strict_json(tmp_path):
    path = tmp_path / "timeline.jsonl"
    timeline = TimelineFile(path)
    timeline.write([{"kind": "sample", "t_s": 1.0, "host": {"free": float("-inf")}, "vms": {}}])
    timeline.close()
    assert strict_loads(lines(path)[0])["host"]["free"] is None


def test_rotation_keeps_the_file_under_its_cap_and_one_old_file(tmp_path):
    path = tmp_path / "events.jsonl"
    events = EventLog(path, "h-1", max_bytes=1000)
    for number in range(100):  # ~70 bytes a line: 7,000 bytes in all
        events.write([{"event": "join", "vm": f"vm{number:03d}"}])
    events.close()
    current, old = path, tmp_path / "events.jsonl.1"
    assert current.stat().st_size <= 1000 and old.stat().st_size <= 1000
    assert not (tmp_path / "events.jsonl.2").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.jsonl", "events.jsonl.1"]
    # no line split across files, none lost between the two kept: the newest ones are there
    kept = [json.loads(line)["vm"] for line in lines(old) + lines(current)]
    assert kept == [f"vm{n:03d}" for n in range(100 - len(kept), 100)]


def test_rotation_with_more_files_kept_and_none(tmp_path):
    three = JsonLinesFile(tmp_path / "t.jsonl", max_bytes=20, keep=3)
    for number in range(10):
        three.write_line(f'{{"n":"{number:09d}"}}')  # 17 bytes + newline: one line per file
    three.close()
    assert [json.loads(lines(tmp_path / name)[0])["n"] for name in ("t.jsonl.3", "t.jsonl.2", "t.jsonl.1", "t.jsonl")] \
        == ["000000006", "000000007", "000000008", "000000009"]
    assert not (tmp_path / "t.jsonl.4").exists()
    none = JsonLinesFile(tmp_path / "n.jsonl", max_bytes=20, keep=0)
    for number in range(3):
        none.write_line(f'{{"n":"{number:09d}"}}')
    none.close()
    assert [p.name for p in tmp_path.glob("n.jsonl*")] == ["n.jsonl"] and lines(tmp_path / "n.jsonl") == [
        '{"n":"000000002"}']


def test_an_existing_file_counts_towards_the_cap(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text("x" * 995 + "\n")
    log = JsonLinesFile(path, max_bytes=1000)
    log.write_line('{"a":1}')
    log.close()
    assert lines(path) == ['{"a":1}'] and lines(tmp_path / "events.jsonl.1") == ["x" * 995]


def test_a_line_longer_than_the_cap_is_still_written_once(tmp_path):
    log = JsonLinesFile(tmp_path / "e.jsonl", max_bytes=10)
    log.write_line('{"long":"' + "y" * 50 + '"}')
    log.write_line('{"b":2}')
    log.close()
    assert lines(tmp_path / "e.jsonl") == ['{"b":2}'] and len(lines(tmp_path / "e.jsonl.1")) == 1


def test_a_write_that_fails_is_dropped_counted_and_warned_once(tmp_path, caplog, monkeypatch):
    log = JsonLinesFile(tmp_path / "e.jsonl", max_bytes=1000)

    def full(*_):
        raise OSError(28, "No space left on device")
    assert log._file is not None
    monkeypatch.setattr(log._file, "write", full)
    for _ in range(5):
        log.write_line('{"a":1}')
    assert log.dropped == 5
    assert caplog.text.count("cannot write") == 1
    monkeypatch.undo()
    log.write_line('{"a":2}')
    log.close()
    assert "writing again (5 records were dropped)" in caplog.text
    assert lines(tmp_path / "e.jsonl") == ['{"a":2}']


def test_a_rotation_that_cannot_rename_does_not_raise(tmp_path, monkeypatch):
    log = JsonLinesFile(tmp_path / "e.jsonl", max_bytes=10)
    log.write_line('{"a":1}')

    def refuse(*_):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr("hostd.eventlog.os.replace", refuse)
    log.write_line('{"a":2}')  # would rotate
    assert log.dropped == 1
    monkeypatch.undo()
    log.write_line('{"a":3}')
    log.close()
    assert lines(tmp_path / "e.jsonl") == ['{"a":3}']


def test_max_bytes_must_be_positive(tmp_path):
    with pytest.raises(ValueError):
        JsonLinesFile(tmp_path / "e.jsonl", max_bytes=0)


@pytest.mark.parametrize(("text", "shown"), [
    ("plain reason", "plain reason"),
    ("line\nforged: vm db joined", "line\\nforged: vm db joined"),
    ("\x1b[2J\x1b]0;pwned\x07red", "\\x1b[2J\\x1b]0;pwned\\x07red"),
    ("cr\roverwrite\ttab", "cr\\roverwrite\\ttab"),
    ("c1 \x9b31m", "c1 \\x9b31m"),
    ("bidi \u202eevil", "bidi \\u202eevil"),
    ("nul\x00 del\x7f", "nul\\x00 del\\x7f"),
    ("back\\slash", "back\\\\slash"),
    ("lone \udcff", "lone \\udcff"),
    ("ünïcödé ok ✓", "ünïcödé ok ✓"),
    (b"bytes \xff\n", "bytes \\\\xff\\n"),
    (42, "42"),
])
def test_printable_escapes_what_could_forge_lines_or_drive_a_terminal(text, shown):
    assert printable(text) == shown


def test_printable_caps_the_length_with_an_ellipsis():
    assert printable("a" * 1024, 10) == "a" * 9 + "…"
    assert printable("a" * 10, 10) == "a" * 10
    assert printable("\n" * 100, 10) == "\\n" * 4 + "…"
    escaped = printable("\x1b" * 1024, 200)
    assert len(escaped) <= 200 and escaped.endswith("…") and "\x1b" not in escaped


def test_printable_output_has_no_control_characters():
    every = "".join(chr(code) for code in (*range(0x3000), *range(0xD800, 0xE000, 7), *range(0xFE00, 0x10000),
                                           0x1F600, 0xE0001, 0x10FFFF))
    out = printable(every, len(every) * 10)
    assert all(char.isprintable() for char in out)
