"""`balloonctl run` on every example scenario (each must hold), and a failing assertion: exit
code 1 and a JUnit failure that names it."""

from __future__ import annotations

import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import require_root, require_swap

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.swap]
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "scenarios").glob("*.toml"))

FAILING = '''
name = "failing"
duration = "4s"
[guests.small]
memory = "128MiB"
swap = "128MiB"
phases = "active 32MiB"
[[timeline]]
at = "1s"
guest = "small"
target = "16MiB"
[[assert]]
name = "impossible balloon"
guest = "small"
metric = "balloon_bytes"
agg = "max"
op = ">"
value = "1GiB"
[[assert]]
name = "no OOM kill"
guest = "small"
metric = "oom_kills"
op = "=="
value = 0
'''


def _run(scenario: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "balloonctl", "run", str(scenario), "--out", str(out)],
                          capture_output=True, text=True, timeout=180, cwd=ROOT)


def _junit(path: Path) -> dict[str, ET.Element]:
    return {case.get("name", ""): case for case in ET.parse(path).getroot().iter("testcase")}


@pytest.mark.parametrize("scenario", EXAMPLES, ids=[path.stem for path in EXAMPLES])
def test_example_scenario_holds(scenario, tmp_path):
    require_root()
    require_swap()
    started = time.monotonic()
    result = _run(scenario, tmp_path)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    print(f"{scenario.stem}: {took:.0f} s for a {result.stdout.split(' s timeline')[0].rsplit('(', 1)[-1]} s timeline")
    cases = _junit(tmp_path / "junit.xml")
    assert cases and all(case.find("failure") is None for case in cases.values())
    assert all(f"PASS  {name}" in result.stdout for name in cases)
    assert (tmp_path / "timeline.csv").read_text().count("\n") > 10
    assert (tmp_path / "timeline.png").stat().st_size > 1000


def test_failing_assertion_exits_1_and_names_it_in_junit(tmp_path):
    require_root()
    require_swap()
    scenario = tmp_path / "failing.toml"
    scenario.write_text(FAILING)
    result = _run(scenario, tmp_path / "out")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL  impossible balloon" in result.stdout and "PASS  no OOM kill" in result.stdout
    assert "1 of 2 assertions failed" in result.stderr
    cases = _junit(tmp_path / "out" / "junit.xml")
    failure = cases["impossible balloon"].find("failure")
    assert failure is not None and (failure.get("message") or "").startswith("impossible balloon: small balloon_bytes")
    assert cases["no OOM kill"].find("failure") is None


def test_a_broken_scenario_is_a_usage_error(tmp_path):
    scenario = tmp_path / "broken.toml"
    scenario.write_text(FAILING.replace('metric = "balloon_bytes"', 'metric = "balloon"'))
    result = _run(scenario, tmp_path / "out")
    assert result.returncode == 2 and "metric = 'balloon'; known:" in result.stderr
