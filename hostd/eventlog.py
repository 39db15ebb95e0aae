"""What hostd writes to disk and to its log: the event log (`--event-log`), the timeline
(`--timeline`) and `printable`, for text from peers on its way into log messages.

Both files are JSON Lines in strict JSON (`hostd.jsonout`: a non-finite number is null) and
both are capped: a file that would grow past `max_bytes` (default 64 MiB) is renamed to
`FILE.1` (the previous `FILE.1` is dropped, or shifted to `FILE.2`… with `keep` > 1) and a
new one is started. Without the cap, hello/bye churn from one peer grew the event log by
1.3 KB per cycle without bound (review S21).

A write that fails (disk full, read-only file system, a rotation that cannot rename) never
stops hostd: the record is dropped, counted in `dropped`, and one warning is logged until a
write succeeds again."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import IO, Any

from hostd.jsonout import dumps

__all__ = ["DEFAULT_KEEP", "DEFAULT_MAX_BYTES", "EventLog", "JsonLinesFile", "TimelineFile", "printable"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 << 20
DEFAULT_KEEP = 1  # rotated files kept beside the current one
DEFAULT_PRINTABLE_CHARS = 200


def printable(text: object, max_chars: int = DEFAULT_PRINTABLE_CHARS) -> str:
    """`text` made safe for a log line: every character that is not printable (control
    characters such as newline, carriage return and ESC, which starts terminal escape
    sequences; C1 controls; bidi overrides and other format characters; unpaired surrogates)
    is written as a Python escape (`\\n`, `\\x1b`, `\\u202e`), a backslash as `\\\\`, and the
    result is at most `max_chars` characters, ending in `…` when cut. Bytes are decoded as
    UTF-8 with undecodable bytes escaped; anything else goes through `str` first.

    For peer-supplied strings in the core's log calls, e.g.
    `log.info("vm %s left (%s)", printable(vm_id), printable(reason))`: a `bye.reason` can no
    longer forge log lines or drive the operator's terminal."""
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode("utf-8", "backslashreplace")
    elif not isinstance(text, str):
        text = str(text)
    max_chars = max(1, max_chars)
    if len(text) <= max_chars and text.isprintable() and "\\" not in text:
        return text  # the common case: nothing to escape
    out: list[str] = []
    length = 0
    for index, char in enumerate(text):
        if char == "\\":
            piece = "\\\\"
        elif char.isprintable():
            piece = char
        else:
            piece = _escape(char)
        # keep room for the ellipsis unless this piece ends the text
        room = max_chars if index == len(text) - 1 else max_chars - 1
        if length + len(piece) > room:
            out.append("…")
            break
        out.append(piece)
        length += len(piece)
    return "".join(out)


def _escape(char: str) -> str:
    code = ord(char)
    if char in "\n\r\t":
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}[char]
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


class JsonLinesFile:
    """One strict-JSON record per line, appended, with a size cap and rotation."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES, keep: int = DEFAULT_KEEP) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, not {max_bytes}")
        self.path = path
        self.max_bytes = max_bytes
        self.keep = max(0, keep)
        self.dropped = 0  # records lost to write errors
        self.rotations = 0
        self._failing = False
        self._file: IO[str] | None = None
        self._size = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._open()

    def _open(self) -> None:
        self._file = self.path.open("a", buffering=1, encoding="utf-8")
        self._size = self._file.tell()

    def write_lines(self, lines: list[str]) -> None:
        """Several records in one write (one system call for a batch of events)."""
        if lines:
            self.write_line("\n".join(lines))

    def write_line(self, line: str) -> None:
        """`line` (one JSON document, ASCII, no newline; or several joined by newlines)
        appended; rotates first when it would take the file past max_bytes. Never raises OSError."""
        size = len(line) + 1  # dumps writes ASCII only: characters are bytes
        try:
            if self._file is None:
                self._open()
            if self._size > 0 and self._size + size > self.max_bytes:
                self._rotate()
            assert self._file is not None
            self._file.write(line + "\n")
            self._size += size
        except OSError as exc:
            self.dropped += 1
            if not self._failing:
                log.warning("%s: cannot write (%s); dropping records until it works again", self.path, exc)
            self._failing = True
            return
        if self._failing:
            log.warning("%s: writing again (%d records were dropped)", self.path, self.dropped)
            self._failing = False

    def _rotate(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.keep == 0:
            self.path.unlink(missing_ok=True)
        else:
            for number in range(self.keep - 1, 0, -1):
                older = self._rotated(number)
                if older.exists():
                    os.replace(older, self._rotated(number + 1))
            os.replace(self.path, self._rotated(1))
        self.rotations += 1
        self._open()

    def _rotated(self, number: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{number}")

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                log.warning("%s: closing: %s", self.path, exc)
            self._file = None


class EventLog:
    """Appends one JSON line per event; also logs it at DEBUG."""

    def __init__(self, path: Path | None, session_id: str, max_bytes: int = DEFAULT_MAX_BYTES,
                 keep: int = DEFAULT_KEEP) -> None:
        self._file = JsonLinesFile(path, max_bytes, keep) if path is not None else None
        self._session_id = session_id

    def write(self, events: list[dict[str, Any]]) -> None:
        now_s = round(time.time(), 3)
        lines = [dumps({"ts": now_s, "session": self._session_id, **event}) for event in events]
        if log.isEnabledFor(logging.DEBUG):
            for line in lines:
                log.debug("event %s", line)
        if self._file is not None:
            self._file.write_lines(lines)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class TimelineFile:
    """`--timeline`: a sample per second and every decision, appended as JSON Lines."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES, keep: int = DEFAULT_KEEP) -> None:
        self._file = JsonLinesFile(path, max_bytes, keep)

    def write(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self._file.write_line(dumps(record))

    def close(self) -> None:
        self._file.close()
