"""The pytest plugin as a user meets it: a throwaway project in a temporary directory with its
own pytest.ini, conftest and test file, using balloon_host / balloon_guest against real
cgroups, run by pytest in a subprocess; then its report, JUnit XML and artifacts are read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from tests.conftest import require, require_root, require_swap

pytestmark = [pytest.mark.integration]

SERVICE = '''
import http.server, random, sys
port, mib = int(sys.argv[1]), int(sys.argv[2])
data = bytearray(mib << 20)
for i in range(0, len(data), 4096):
    data[i] = 1

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        offset = random.randrange(0, len(data) - 65536)
        body = str(sum(data[offset:offset + 65536:4096])).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''

TESTS = '''
import socket, sys, time, urllib.request
from pathlib import Path

import pytest

from balloonlab import assert_answering, assert_no_oom_kills, assert_throughput_within, measure

SERVICE = Path(__file__).with_name("service.py")


def start(balloon_guest):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    guest = balloon_guest([sys.executable, str(SERVICE), str(port), "120"], name="svc", memory="256MiB",
                          swap="256MiB")
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return guest, url
        except OSError:
            assert time.monotonic() < deadline, "the service never answered"
            time.sleep(0.2)


@pytest.mark.balloonlab(host_memory="1GiB")
def test_service_keeps_answering_when_squeezed(balloon_guest):
    guest, url = start(balloon_guest)
    get = lambda: urllib.request.urlopen(url, timeout=5).read()
    baseline = measure(get, seconds=1.5)
    result = guest.squeeze(to="150MiB", timeout=40)
    squeezed = measure(get, seconds=1.5)
    print(f"BASELINE {baseline}\\nSQUEEZED {squeezed}\\nBALLOON {result.balloon_bytes >> 20} MiB "
          f"SWAP {guest.facts().swap_mib:.0f} MiB")
    assert result.balloon_bytes >= 64 << 20
    assert_answering(squeezed)
    assert_throughput_within(squeezed, baseline, factor=1000, guest=guest)
    assert_no_oom_kills(guest)


def test_deliberately_failing(balloon_guest):
    guest, url = start(balloon_guest)
    guest.squeeze(to="200MiB", timeout=30)
    assert guest.facts().balloon_bytes == 0, "the balloon is not empty (deliberately failing)"
'''

CONFTEST = '''
import os

import balloonlab.pytest_plugin

if os.environ.get("FAKE_NOT_ROOT"):
    balloonlab.pytest_plugin.lab_unavailable_reason = lambda: "balloonlab needs root (faked for the test)"
'''


def _project(tmp_path: Path) -> Path:
    project = tmp_path / "user-project"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\nballoonlab_dir = results\n")
    (project / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (project / "service.py").write_text(SERVICE)
    (project / "test_service.py").write_text(TESTS)
    return project


def _pytest(project: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "-s",
                           "--junitxml", str(project / "junit.xml"), *args], cwd=project, env=environment,
                          capture_output=True, text=True, timeout=150)


def _cases(project: Path) -> dict[str, ET.Element]:
    return {case.get("name", ""): case for case in ET.parse(project / "junit.xml").getroot().iter("testcase")}


def test_plugin_is_registered_by_its_entry_point():
    names = [ep.name for ep in entry_points(group="pytest11")]
    require("balloonlab" in names, "balloonlab is not installed (make venv: pip install -e .)")
    assert next(ep for ep in entry_points(group="pytest11") if ep.name == "balloonlab").value == \
        "balloonlab.pytest_plugin"


def test_user_project_passes_and_fails_with_timelines(tmp_path):
    require_root()
    require_swap()
    project = _project(tmp_path)
    run = _pytest(project)
    output = run.stdout + run.stderr
    assert run.returncode == 1, output  # one test passes, one fails on purpose
    cases = _cases(project)
    assert cases["test_service_keeps_answering_when_squeezed"].find("failure") is None, output
    failure = cases["test_deliberately_failing"].find("failure")
    assert failure is not None, output
    assert "deliberately failing" in (failure.get("message") or "")

    results = project / "results"
    passed = results / "test_service.py-test_service_keeps_answering_when_squeezed"
    failed = results / "test_service.py-test_deliberately_failing"
    # The failure names its timeline, and the file is there.
    assert f"balloonlab timeline: {failed / 'timeline.jsonl'}" in output, output
    for directory in (passed, failed):
        rows = [json.loads(line) for line in (directory / "timeline.jsonl").read_text().splitlines()]
        samples = [row for row in rows if row.get("vm_id") == "svc"]
        assert samples, f"no samples of the guest in {directory}"
        assert any(row.get("event", "").startswith("squeeze svc") for row in rows)
        assert max(row["balloon_bytes"] for row in samples) > 0
        assert (directory / "timeline.csv").is_file()
        assert (directory / "timeline.png").stat().st_size > 1000
        assert (directory / "logs" / "svc.log").is_file()
    print(next(line for line in output.splitlines() if "BASELINE" in line))
    print(next(line for line in output.splitlines() if "SQUEEZED" in line))
    print(next(line for line in output.splitlines() if "BALLOON " in line))


def test_without_root_it_skips_with_the_reason_and_fails_under_ci(tmp_path):
    project = _project(tmp_path)
    run = _pytest(project, "-k", "deliberately", env={"FAKE_NOT_ROOT": "1"})
    assert run.returncode == 0, run.stdout
    assert "SKIPPED" in run.stdout and "balloonlab needs root (faked for the test)" in run.stdout
    run = _pytest(project, "-k", "deliberately", env={"FAKE_NOT_ROOT": "1", "CI": "true"})
    assert run.returncode == 1, run.stdout
    assert "CI must provide this, but: balloonlab needs root (faked for the test)" in run.stdout
