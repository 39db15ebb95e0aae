"""Scenario files, pure parts: parsing with errors that name the key, assertions evaluated on
a timeline, and the JUnit XML a CI reads."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from balloonlab.scenario import ScenarioError, load_scenario, parse_scenario
from balloonlab.timeline import Sample, Timeline
from balloonlab.verdicts import evaluate, junit_xml

MiB = 1 << 20
EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "scenarios").glob("*.toml"))

MINIMAL = '''
name = "t"
duration = "20s"
[guests.web]
memory = "256MiB"
phases = "active 64MiB"
[guests.db]
memory = "256MiB"
phases = "idle"
[[timeline]]
at = "5s"
guest = "web"
squeeze_to = "128MiB"
[[timeline]]
at = "2s"
host = { idle_tax = 0.5, memory = "1GiB", sample_period = "2s" }
[[assert]]
name = "squeezed"
guest = "web"
metric = "balloon_bytes"
during = ["5s", "20s"]
agg = "max"
op = ">="
value = "100MiB"
[[assert]]
name = "web above db"
guest = "web"
metric = "alloc_target_bytes"
op = ">"
than = { guest = "db", factor = 1.5 }
'''


def test_the_examples_parse():
    assert {path.stem for path in EXAMPLES} >= {"fig7-idle-tax", "service-squeezed-to-half", "idle-gives-to-busy"}
    for path in EXAMPLES:
        scenario = load_scenario(path)
        assert scenario.assertions and scenario.guests and scenario.duration_s > 0


def test_minimal_scenario_parses_in_time_order():
    scenario = parse_scenario(MINIMAL)
    assert [action.at_s for action in scenario.actions] == [2.0, 5.0]
    host, squeeze = scenario.actions
    assert host.value == {"idle_tax": 0.5, "memory": 1 << 30, "sample_period": 2000}
    assert squeeze.kind == "squeeze_to" and squeeze.value == 128 * MiB and squeeze.guest == "web"
    squeezed, above = scenario.assertions
    assert squeezed.window_s == (5.0, 20.0) and squeezed.value == 100 * MiB and squeezed.agg == "max"
    assert above.than is not None and above.than.guest == "db" and above.than.factor == 1.5 and above.agg == "last"


@pytest.mark.parametrize(("change", "message"), [
    (("duration = \"20s\"", ""), "duration is missing"),
    (("metric = \"balloon_bytes\"", "metric = \"balloon\""), "metric = 'balloon'; known:"),
    (("op = \">=\"", "op = \"=>\""), "op = '=>'"),
    (("guest = \"web\"\nsqueeze_to", "guest = \"nope\"\nsqueeze_to"), "guest = 'nope' is not one of"),
    (("at = \"5s\"", "at = \"50s\""), "outside the scenario's duration"),
    (("squeeze_to = \"128MiB\"", "squeeze_to = \"lots\""), "[[timeline]] #1 squeeze_to"),
    (("during = [\"5s\", \"20s\"]", "during = [\"15s\", \"5s\"]"), "during must be a window"),
    (("phases = \"idle\"", "phases = \"idle\"\nflavour = 1"), "[guests.db]: unknown keys ['flavour']"),
    (("value = \"100MiB\"", "value = \"100MiB\"\nthan = { guest = \"db\" }"), "give value = N"),
])
def test_errors_name_the_key(change, message):
    old, new = change
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(MINIMAL.replace(old, new, 1), "my.toml")
    assert message in str(caught.value)
    assert str(caught.value).startswith("my.toml")


def _timeline() -> Timeline:
    timeline = Timeline()
    for t in range(21):
        for vm, balloon, target in (("web", min(t, 10) * 12 * MiB, 200 * MiB), ("db", 0, 100 * MiB)):
            timeline.add([Sample(float(t), vm, True, "idle", 256 * MiB, balloon, balloon, target, 200 * MiB,
                                 0, balloon, 0, 0, 0, extra={"probe_failures": float(t >= 15)})])
    return timeline


def test_assertions_evaluate_on_the_timeline():
    scenario = parse_scenario(MINIMAL)
    squeezed, above = (evaluate(assertion, _timeline()) for assertion in scenario.assertions)
    assert squeezed.passed and "120.0 MiB >= 100.0 MiB" in squeezed.detail
    assert above.passed and "1.5 × db alloc_target_bytes 100.0 MiB" in above.detail
    failing = parse_scenario(MINIMAL.replace('metric = "balloon_bytes"', 'metric = "probe_failures"')
                             .replace('value = "100MiB"', "value = 0").replace('op = ">="', 'op = "=="'))
    verdict = evaluate(failing.assertions[0], _timeline())
    assert not verdict.passed and "does not hold" in verdict.detail


def test_junit_failure_names_the_assertion():
    scenario = parse_scenario(MINIMAL.replace('value = "100MiB"', 'value = "1GiB"'))
    verdicts = [evaluate(assertion, _timeline()) for assertion in scenario.assertions]
    root = ET.fromstring(junit_xml(scenario, verdicts, 12.5, Path("/tmp/t/timeline.jsonl")))
    suite = root.find("testsuite")
    assert suite is not None and suite.get("tests") == "2" and suite.get("failures") == "1"
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    failure = cases["squeezed"].find("failure")
    assert failure is not None and (failure.get("message") or "").startswith("squeezed: web balloon_bytes")
    assert "timeline: /tmp/t/timeline.jsonl" in (failure.text or "")
    assert cases["web above db"].find("failure") is None
