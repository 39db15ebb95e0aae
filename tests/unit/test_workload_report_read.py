"""The agent reads the workload's report as untrusted input (the workload writes it)."""

from __future__ import annotations

import os
import threading

import pytest

from guestagent.client import WORKLOAD_REPORT_MAX_BYTES, read_workload_report


def test_a_regular_report_is_read(tmp_path):
    report = tmp_path / "workload.json"
    report.write_text('{"touches_per_s": 5}')
    assert read_workload_report(report) == '{"touches_per_s": 5}'


def test_a_symlink_is_not_followed(tmp_path):
    (tmp_path / "workload.json").symlink_to("/dev/zero")
    with pytest.raises(OSError):
        read_workload_report(tmp_path / "workload.json")


def test_a_fifo_nobody_writes_does_not_block(tmp_path):
    fifo = tmp_path / "workload.json"
    os.mkfifo(fifo)
    result: list[BaseException] = []

    def read() -> None:
        try:
            read_workload_report(fifo)
        except OSError as exc:
            result.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    assert not reader.is_alive() and result


def test_a_huge_report_is_refused(tmp_path):
    report = tmp_path / "workload.json"
    report.write_bytes(b" " * (WORKLOAD_REPORT_MAX_BYTES + 1))
    with pytest.raises(OSError):
        read_workload_report(report)
