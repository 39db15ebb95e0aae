"""A scenario's assertions judged against a timeline (pure: a timeline in, verdicts out), and
the JUnit XML that reports them."""

from __future__ import annotations

import statistics
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from balloonlab.scenario import OPS, AssertionDef, Scenario
from balloonlab.timeline import Sample, Timeline


@dataclass(frozen=True, slots=True)
class Verdict:
    name: str
    passed: bool
    detail: str


def aggregate(samples: Sequence[Sample], metric: str, agg: str, window: tuple[float, float] | None
              ) -> float | None:
    values = [s.value(metric) for s in samples if window is None or window[0] <= s.t_s <= window[1]]
    known = [v for v in values if v is not None]
    if not known:
        return None
    if agg == "first":
        return known[0]
    if agg == "last":
        return known[-1]
    if agg == "min":
        return min(known)
    if agg == "max":
        return max(known)
    if agg == "delta":
        return known[-1] - known[0]
    return statistics.fmean(known)


def _shown(metric: str, value: float) -> str:
    if metric.endswith("_bytes"):
        return f"{value / (1 << 20):.1f} MiB"
    return f"{value:g}"


def evaluate(assertion: AssertionDef, timeline: Timeline) -> Verdict:
    samples = timeline.samples
    window = assertion.window_s
    span = "the whole run" if window is None else f"{window[0]:g}–{window[1]:g} s"

    def of(guest: str, metric: str) -> float | None:
        return aggregate([s for s in samples if s.vm_id == guest], metric, assertion.agg, window)

    left = of(assertion.guest, assertion.metric)
    subject = f"{assertion.guest} {assertion.metric} ({assertion.agg} over {span})"
    if left is None:
        return Verdict(assertion.name, False, f"{subject}: no samples")
    if assertion.than is not None:
        other = of(assertion.than.guest, assertion.than.metric)
        if other is None:
            return Verdict(assertion.name, False, f"{assertion.than.guest} {assertion.than.metric}: no samples")
        right = assertion.than.factor * other
        factor = "" if assertion.than.factor == 1 else f"{assertion.than.factor:g} × "
        against = f"{factor}{assertion.than.guest} {assertion.than.metric} {_shown(assertion.than.metric, other)}"
    else:
        assert assertion.value is not None
        right = assertion.value
        against = _shown(assertion.metric, right)
    passed = OPS[assertion.op](left, right)
    return Verdict(assertion.name, passed, f"{subject} = {_shown(assertion.metric, left)} {assertion.op} {against}"
                   + ("" if passed else "  (does not hold)"))


def junit_xml(scenario: Scenario, verdicts: Sequence[Verdict], seconds: float, timeline_path: Path | None
              ) -> bytes:
    failures = sum(not v.passed for v in verdicts)
    suites = ET.Element("testsuites", name="balloonlab scenarios")
    suite = ET.SubElement(suites, "testsuite", name=scenario.name, tests=str(len(verdicts)),
                          failures=str(failures), errors="0", skipped="0", time=f"{seconds:.3f}")
    for verdict in verdicts:
        case = ET.SubElement(suite, "testcase", classname=f"scenario.{scenario.name}", name=verdict.name, time="0")
        if not verdict.passed:
            failure = ET.SubElement(case, "failure", message=f"{verdict.name}: {verdict.detail}", type="assertion")
            failure.text = f"{verdict.detail}\nscenario: {scenario.source}" + (
                f"\ntimeline: {timeline_path}" if timeline_path else "")
        else:
            ET.SubElement(case, "system-out").text = verdict.detail
    return bytes(ET.tostring(suites, encoding="utf-8", xml_declaration=True))
