"""balloonlab's pytest plugin (entry point `pytest11: balloonlab`, loaded by pytest once
balloonlab is installed).

Fixtures:
    balloon_host    a started `Lab` (its own hostd; host memory from @pytest.mark.balloonlab(host_memory=...)
                    or the ini option balloonlab_host_memory, default 1GiB), sampling a timeline
    balloon_guest   a factory: balloon_guest(command, memory=, swap=, shares=, name=) makes a guest in a
                    memory cgroup; balloon_guest(attach="docker:NAME" | "cgroup:PATH" | "pid:PID") attaches
                    to one that exists

Per test using them, the timeline is saved as DIR/TEST/timeline.jsonl (+ timeline.png with
matplotlib, + timeline.csv) where DIR is --balloonlab-dir or the ini option balloonlab_dir
(default balloonlab-results); a failing test's report names the file.

Without root, swap or a memory cgroup controller the fixtures skip with the reason — and fail
instead when CI=true, where a skipped memory test would hide a broken runner.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from balloonlab.guest import Guest, Size
from balloonlab.host import lab_unavailable_reason
from balloonlab.lab import Lab

LAB_KEY = pytest.StashKey["Lab"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("balloonlab", "memory ballooning (balloonlab)")
    group.addoption("--balloonlab-dir", default=None,
                    help="where per-test timelines go (default: ini balloonlab_dir, else balloonlab-results)")
    parser.addini("balloonlab_dir", "where per-test timelines go", default="balloonlab-results")
    parser.addini("balloonlab_host_memory", "balloon_host's memory budget", default="1GiB")
    parser.addini("balloonlab_sample_interval", "seconds between timeline samples", default="0.5")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "balloonlab(host_memory='1GiB', idle_tax=0.75, sample_period='5s', "
                            "balance_period='1s'): settings of the test's balloon_host")


def _require_lab() -> None:
    reason = lab_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must provide this, but: {reason}")
    pytest.skip(reason)


def results_dir(config: pytest.Config) -> Path:
    value = config.getoption("--balloonlab-dir") or config.getini("balloonlab_dir")
    path = Path(str(value))
    return path if path.is_absolute() else Path(config.rootpath) / path


def _test_dir_name(nodeid: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", nodeid.replace("::", "-")).strip("-")[:150]


def save_artifacts(lab: Lab) -> list[Path]:
    """The lab's timeline as JSON Lines, CSV and (with matplotlib) PNG; the logs beside them."""
    if lab.timeline_path is None:
        return []
    jsonl = lab.timeline.write_jsonl(lab.timeline_path)
    written = [jsonl, lab.timeline.write_csv(jsonl.with_suffix(".csv"))]
    png = jsonl.with_suffix(".png")
    if lab.timeline.plot(png, jsonl.parent.name):
        written.append(png)
    logs = jsonl.parent / "logs"
    logs.mkdir(exist_ok=True)
    for log in lab.workdir.glob("*.log"):
        shutil.copy(log, logs / log.name)
    return written


@pytest.fixture
def balloon_host(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A started Lab for this test; its timeline is saved when the test ends."""
    _require_lab()
    config = request.config
    marker = request.node.get_closest_marker("balloonlab")
    settings: dict[str, Any] = dict(marker.kwargs) if marker else {}
    settings.setdefault("host_memory", config.getini("balloonlab_host_memory"))
    lab = Lab(workdir=tmp_path_factory.mktemp("balloonlab"), **settings)
    lab.timeline_path = results_dir(config) / _test_dir_name(request.node.nodeid) / "timeline.jsonl"
    request.node.stash[LAB_KEY] = lab
    with lab:
        lab.watch(float(config.getini("balloonlab_sample_interval")))
        yield lab
    save_artifacts(lab)


@pytest.fixture
def balloon_guest(balloon_host: Lab) -> Callable[..., Guest]:
    """balloon_guest(command=None, *, name=None, attach=None, memory="256MiB", swap="256MiB",
    shares=None, phases=None, env=None) -> Guest"""
    count = [0]

    def make(command: Sequence[str] | None = None, *, name: str | None = None, attach: str | None = None,
             memory: Size = "256MiB", swap: Size = "256MiB", shares: int | str | None = None,
             phases: str | None = None, env: dict[str, str] | None = None) -> Guest:
        if attach is not None:
            return balloon_host.attach(attach, vm_id=name, shares=shares)
        count[0] += 1
        return balloon_host.guest(name or f"guest{count[0]}", command=command, phases=phases, memory=memory,
                                  swap=swap, shares=shares, env=env)

    return make


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    lab = item.stash.get(LAB_KEY, None)
    if lab is not None and report.when == "call" and report.failed:
        try:
            written = save_artifacts(lab)  # now, so that the file named in the failure exists
        except OSError as exc:
            text = f"balloonlab: the timeline could not be saved: {exc}"
        else:
            text = "balloonlab timeline: " + ", ".join(str(path) for path in written)
        add_section = getattr(report.longrepr, "addsection", None)
        if callable(add_section):
            add_section("balloonlab", text)
        report.sections.append(("balloonlab", text))
    return report
