"""balloonlab.Lab always cleans up: after an exception, on Ctrl-C (SIGINT) and SIGTERM, and —
through PR_SET_PDEATHSIG and the next lab's sweep — even after kill -9 of the test process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import require_root, require_swap

pytestmark = [pytest.mark.integration, pytest.mark.root]
ROOT = Path(__file__).resolve().parents[2]

SCRIPT = '''
import signal, sys, time
from balloonlab import Lab
# Ctrl-C as in a terminal: a test run started as a background job inherits SIGINT ignored (POSIX
# shells ignore it for asynchronous commands), and Python then never raises KeyboardInterrupt.
signal.signal(signal.SIGINT, signal.default_int_handler)
lab = Lab(host_memory="512MiB", workdir=sys.argv[1])
with lab:
    guest = lab.guest("g", phases="grow to 64MiB at 256MiB/s, idle", memory="128MiB", swap="128MiB")
    print(guest.cgroup.parent, lab._hostd.pid, guest.process.pid, flush=True)
    if sys.argv[2] == "raise":
        raise RuntimeError("a failing test")
    time.sleep(120)
'''


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.parametrize("how", ["raise", "SIGINT", "SIGTERM", "SIGKILL"])
def test_lab_leaves_nothing_behind(tmp_path, how):
    require_root()
    require_swap()
    process = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path), how], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = process.stdout.readline()
        assert line, process.stderr.read()
        parent, hostd_pid, supervisor_pid = line.split()
        parent_path = Path(parent)
        assert parent_path.is_dir()
        if how != "raise":
            os.kill(process.pid, getattr(signal, how))
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:  # say where it hangs
            subprocess.run(["ps", "-o", "pid,ppid,stat,wchan:25,cmd", "--ppid", str(process.pid), "-p",
                            str(process.pid)])
            raise
        _wait(lambda: _gone(int(hostd_pid)) and _gone(int(supervisor_pid)), 30, "hostd and the guest to stop")
        if how == "SIGKILL":  # nothing ran in the lab's process: the next lab sweeps its cgroups
            from balloonlab.lab import remove_stale_cgroups

            assert parent_path in remove_stale_cgroups()
        assert not parent_path.exists(), f"{parent_path} left behind"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()
