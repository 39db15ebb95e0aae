"""Scenario files: guests, a timeline of actions and assertions, run by `balloonctl run FILE`.

    name = "squeeze-web"
    duration = "30s"                      # the timeline's length (after every guest registered)

    [host]                                # the lab's hostd
    memory = "1GiB"                       # budget; also idle_tax, sample_period, balance_period
    idle_tax = 0.75

    [guests.web]                          # a memory cgroup running a command (or `phases` for
    memory = "256MiB"                     # balloon-workload) beside an agent, or `attach =
    swap = "256MiB"                       # "docker:NAME"` for one that exists; `shares`
    command = ["python3", "-m", "http.server", "{port}"]     # {port}: a free port of this guest
    probe = { http = "http://127.0.0.1:{port}/", every = "500ms" }   # or command = [...]

    [[timeline]]                          # actions at times from the start
    at = "5s"
    guest = "web"
    squeeze_to = "128MiB"                 # or target = "100MiB" | "auto", shares = "high",
                                          # kill_agent = true, stop_agent = true, stop = true
    [[timeline]]
    at = "20s"
    host = { idle_tax = 0.0, memory = "512MiB" }

    [[assert]]
    name = "web keeps answering"
    guest = "web"
    metric = "probe_failures"             # a timeline field (balloon_bytes, alloc_target_bytes,
    agg = "delta"                         # swap_bytes, oom_kills, ...): first/last/min/max/mean/delta
    during = ["5s", "30s"]                # a window (default: the whole timeline)
    op = "=="                             # < <= > >= == !=
    value = 0                             # a number or a size, or
                                          # than = { guest = "db", metric = "...", factor = 1.2 }

Output: a verdict per assertion, exit code 0 only if all hold, and in the output directory
junit.xml (one testcase per assertion; a failure names it and says what was seen), the
timeline as timeline.csv and timeline.jsonl, and timeline.png (matplotlib).
"""

from __future__ import annotations

import contextlib
import operator
import re
import shlex
import statistics
import subprocess
import threading
import time
import tomllib
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from balloonlab.timeline import SAMPLE_FIELDS, Sample, Timeline
from protocol.units import parse_duration_ms, parse_size_bytes

Progress = Callable[[str], None]
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
OPS: dict[str, Callable[[float, float], bool]] = {"<": operator.lt, "<=": operator.le, ">": operator.gt,
                                                  ">=": operator.ge, "==": operator.eq, "!=": operator.ne}
AGGREGATES = ("first", "last", "min", "max", "mean", "delta")
PROBE_METRICS = ("probe_ok", "probe_failures", "probe_latency_ms")
METRICS = tuple(name for name in SAMPLE_FIELDS if name not in ("t_s", "vm_id", "agent_state")) + PROBE_METRICS
HOST_KEYS = {"idle_tax": "idle_tax_ratio", "memory": "host_memory_bytes", "sample_period": "sample_period_ms",
             "balance_period": "balance_period_ms", "ctl_max_percent": "ctl_max_percent"}


class ScenarioError(ValueError):
    """A scenario file that cannot be run; the message names the file and the key."""


# ---- the file -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Probe:
    http: str | None
    command: tuple[str, ...]
    every_s: float
    timeout_s: float


@dataclass(frozen=True, slots=True)
class GuestDef:
    name: str
    memory_bytes: int
    swap_bytes: int
    command: tuple[str, ...] = ()
    phases: str | None = None
    attach: str | None = None
    shares: int | str | None = None
    probe: Probe | None = None


@dataclass(frozen=True, slots=True)
class Action:
    at_s: float
    guest: str | None
    kind: str  # host | squeeze_to | target | shares | kill_agent | stop_agent | stop | mark
    value: Any

    def describe(self) -> str:
        if self.kind == "host":
            return f"host {', '.join(f'{k}={v}' for k, v in self.value.items())}"
        if self.kind == "mark":
            return str(self.value)
        what = self.kind.replace("_", " ")
        if isinstance(self.value, bool):
            return f"{self.guest} {what}"
        shown = f"{self.value / (1 << 20):g}MiB" if self.kind in ("squeeze_to", "target") and self.value is not None \
            else str(self.value if self.value is not None else "auto")
        return f"{self.guest} {what} {shown}"


@dataclass(frozen=True, slots=True)
class Comparison:
    guest: str
    metric: str
    factor: float = 1.0


@dataclass(frozen=True, slots=True)
class AssertionDef:
    name: str
    guest: str
    metric: str
    agg: str
    window_s: tuple[float, float] | None
    op: str
    value: float | None
    than: Comparison | None


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    source: str
    duration_s: float
    sample_interval_s: float
    host: Mapping[str, Any]
    guests: tuple[GuestDef, ...]
    actions: tuple[Action, ...]
    assertions: tuple[AssertionDef, ...]


def _seconds(where: str, value: object) -> float:
    try:
        return parse_duration_ms(str(value)) / 1000
    except ValueError as exc:
        raise ScenarioError(f"{where}: {exc}") from None


def _size(where: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return parse_size_bytes(str(value))
    except ValueError as exc:
        raise ScenarioError(f"{where}: {exc}") from None


def _table(where: str, value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ScenarioError(f"{where}: must be a table")
    return value


def _only(where: str, table: Mapping[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ScenarioError(f"{where}: unknown keys {unknown}; known: {', '.join(allowed)}")


def _words(where: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(shlex.split(value))
    if not isinstance(value, list) or not value or not all(isinstance(word, str) for word in value):
        raise ScenarioError(f"{where}: a command is a list of strings (or one string, split like a shell)")
    return tuple(value)


def parse_scenario(text: str, source: str = "scenario.toml") -> Scenario:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{source}: not valid TOML: {exc}") from None
    _only(source, document, ("name", "description", "duration", "sample_interval", "host", "guests", "timeline",
                             "assert"))
    name = str(document.get("name") or Path(source).stem)
    if "duration" not in document:
        raise ScenarioError(f"{source}: duration is missing (the timeline's length, e.g. \"60s\")")
    duration = _seconds(f"{source}: duration", document["duration"])
    interval = _seconds(f"{source}: sample_interval", document.get("sample_interval", "500ms"))
    host = _table(f"{source}: [host]", document.get("host", {}))
    _only(f"{source}: [host]", host, ("memory", "idle_tax", "sample_period", "balance_period"))
    guests_table = _table(f"{source}: [guests]", document.get("guests", {}))
    if not guests_table:
        raise ScenarioError(f"{source}: no guests (add a [guests.NAME] table)")
    guests = tuple(_guest(f"{source}: [guests.{key}]", key, _table(f"{source}: [guests.{key}]", value))
                   for key, value in guests_table.items())
    names = {guest.name for guest in guests}
    actions = tuple(sorted((_action(f"{source}: [[timeline]] #{index + 1}", _table(source, item), names, duration)
                            for index, item in enumerate(document.get("timeline", []))), key=lambda a: a.at_s))
    assertions = tuple(_assertion(f"{source}: [[assert]] #{index + 1}", _table(source, item), names, duration)
                       for index, item in enumerate(document.get("assert", [])))
    if not assertions:
        raise ScenarioError(f"{source}: no [[assert]] tables: a scenario without assertions has no verdict")
    seen: set[str] = set()
    for assertion in assertions:
        if assertion.name in seen:
            raise ScenarioError(f"{source}: two assertions named {assertion.name!r}")
        seen.add(assertion.name)
    return Scenario(name, source, duration, interval, host, guests, actions, assertions)


def _guest(where: str, name: str, table: dict[str, Any]) -> GuestDef:
    if not _NAME.match(name):
        raise ScenarioError(f"{where}: a guest name is 1-31 lowercase letters, digits or '-', starting with a letter")
    _only(where, table, ("memory", "swap", "command", "phases", "attach", "shares", "probe"))
    kinds = [key for key in ("command", "phases", "attach") if key in table]
    if len(kinds) > 1:
        raise ScenarioError(f"{where}: give one of command, phases or attach, not {' and '.join(kinds)}")
    if "attach" in table and ("memory" in table or "swap" in table):
        raise ScenarioError(f"{where}: an attached guest has its own limits (no memory/swap here)")
    probe = None
    if "probe" in table:
        spec = _table(f"{where} probe", table["probe"])
        _only(f"{where} probe", spec, ("http", "command", "every", "timeout"))
        if ("http" in spec) == ("command" in spec):
            raise ScenarioError(f"{where} probe: give http = URL or command = [...]")
        probe = Probe(str(spec["http"]) if "http" in spec else None,
                      _words(f"{where} probe command", spec["command"]) if "command" in spec else (),
                      _seconds(f"{where} probe every", spec.get("every", "1s")),
                      _seconds(f"{where} probe timeout", spec.get("timeout", "2s")))
    shares = table.get("shares")
    if shares is not None and not (isinstance(shares, int) or shares in ("low", "normal", "high")):
        raise ScenarioError(f"{where}: shares is low, normal, high or a number")
    return GuestDef(name, _size(f"{where} memory", table.get("memory", "256MiB")),
                    _size(f"{where} swap", table.get("swap", "256MiB")),
                    _words(f"{where} command", table["command"]) if "command" in table else (),
                    str(table["phases"]) if "phases" in table else None,
                    str(table["attach"]) if "attach" in table else None, shares, probe)


_GUEST_ACTIONS = ("squeeze_to", "target", "shares", "kill_agent", "stop_agent", "stop")


def _action(where: str, table: dict[str, Any], names: set[str], duration: float) -> Action:
    _only(where, table, ("at", "guest", "host", "mark", *_GUEST_ACTIONS))
    if "at" not in table:
        raise ScenarioError(f"{where}: at is missing (e.g. at = \"10s\")")
    at = _seconds(f"{where} at", table["at"])
    if not 0 <= at <= duration:
        raise ScenarioError(f"{where}: at = {table['at']} is outside the scenario's duration")
    kinds = [key for key in ("host", "mark", *_GUEST_ACTIONS) if key in table]
    if len(kinds) != 1:
        raise ScenarioError(f"{where}: one action per entry (host, mark, {', '.join(_GUEST_ACTIONS)}); got {kinds}")
    kind = kinds[0]
    value = table[kind]
    guest = table.get("guest")
    if kind in ("host", "mark"):
        if guest is not None:
            raise ScenarioError(f"{where}: {kind} takes no guest")
        if kind == "host":
            settings = _table(f"{where} host", value)
            _only(f"{where} host", settings, tuple(HOST_KEYS))
            converted: dict[str, Any] = {}
            for key, raw in settings.items():
                if key == "memory":
                    converted[key] = _size(f"{where} host.memory", raw)
                elif key.endswith("period"):
                    converted[key] = int(_seconds(f"{where} host.{key}", raw) * 1000)
                else:
                    converted[key] = raw
            value = converted
        return Action(at, None, kind, value)
    if guest not in names:
        raise ScenarioError(f"{where}: guest = {guest!r} is not one of the scenario's guests {sorted(names)}")
    if kind == "squeeze_to":
        value = _size(f"{where} squeeze_to", value)
    elif kind == "target":
        value = None if value == "auto" else _size(f"{where} target", value)
    elif kind in ("kill_agent", "stop_agent", "stop") and value is not True:
        raise ScenarioError(f"{where}: {kind} = true")
    return Action(at, str(guest), kind, value)


def _assertion(where: str, table: dict[str, Any], names: set[str], duration: float) -> AssertionDef:
    _only(where, table, ("name", "guest", "metric", "agg", "during", "at", "op", "value", "than"))
    guest, metric = table.get("guest"), table.get("metric")
    if guest not in names:
        raise ScenarioError(f"{where}: guest = {guest!r} is not one of the scenario's guests {sorted(names)}")
    if metric not in METRICS:
        raise ScenarioError(f"{where}: metric = {metric!r}; known: {', '.join(METRICS)}")
    op = str(table.get("op", ""))
    if op not in OPS:
        raise ScenarioError(f"{where}: op = {op!r}; one of {' '.join(OPS)}")
    window: tuple[float, float] | None = None
    if "during" in table:
        during = table["during"]
        if not isinstance(during, list) or len(during) != 2:
            raise ScenarioError(f"{where}: during = [\"FROM\", \"TO\"]")
        window = (_seconds(f"{where} during", during[0]), _seconds(f"{where} during", during[1]))
        if not 0 <= window[0] < window[1] <= duration:
            raise ScenarioError(f"{where}: during must be a window inside 0..{duration:g} s")
    if "at" in table:
        if window:
            raise ScenarioError(f"{where}: give at or during, not both")
        at = _seconds(f"{where} at", table["at"])
        window = (max(0.0, at - 1.0), at + 1.0)
    agg = str(table.get("agg", "mean" if window else "last"))
    if agg not in AGGREGATES:
        raise ScenarioError(f"{where}: agg = {agg!r}; one of {', '.join(AGGREGATES)}")
    if ("value" in table) == ("than" in table):
        raise ScenarioError(f"{where}: give value = N (or a size) or than = {{ guest = ..., metric = ... }}")
    value: float | None = None
    than: Comparison | None = None
    if "value" in table:
        raw = table["value"]
        value = float(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else float(
            _size(f"{where} value", raw))
    else:
        spec = _table(f"{where} than", table["than"])
        _only(f"{where} than", spec, ("guest", "metric", "factor"))
        other = spec.get("guest", guest)
        if other not in names:
            raise ScenarioError(f"{where} than: guest = {other!r} is not one of the scenario's guests")
        other_metric = spec.get("metric", metric)
        if other_metric not in METRICS:
            raise ScenarioError(f"{where} than: metric = {other_metric!r}; known: {', '.join(METRICS)}")
        than = Comparison(str(other), str(other_metric), float(spec.get("factor", 1.0)))
    name = str(table.get("name") or f"{guest} {metric} {op} {table.get('value', 'than')}")
    return AssertionDef(name, str(guest), str(metric), agg, window, op, value, than)


def load_scenario(path: Path) -> Scenario:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ScenarioError(f"cannot read the scenario {path}: {exc.strerror}") from None
    return parse_scenario(text, str(path))


# ---- verdicts (pure: a timeline in, verdicts out) ---------------------------------------------
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


# ---- running --------------------------------------------------------------------------------
@dataclass
class ScenarioResult:
    scenario: Scenario
    verdicts: list[Verdict]
    out_dir: Path
    junit_path: Path
    wall_s: float  # the whole run: hostd and guests up, the timeline, the teardown
    timeline_s: float  # the timeline alone
    files: list[Path] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.verdicts)

    @property
    def failed_count(self) -> int:
        return sum(not v.passed for v in self.verdicts)

    @property
    def report(self) -> str:
        lines = [f"scenario {self.scenario.name}: {len(self.verdicts) - self.failed_count}/{len(self.verdicts)} "
                 f"assertions hold ({self.timeline_s:.0f} s timeline, {self.wall_s:.0f} s in all)"]
        lines += [f"  {'PASS' if v.passed else 'FAIL'}  {v.name}: {v.detail}" for v in self.verdicts]
        lines.append(f"wrote {', '.join(str(path) for path in self.files)}")
        return "\n".join(lines)


class _Prober:
    """A guest's probe in a thread of its own: the last answer, failures so far, latency."""

    def __init__(self, probe: Probe, port: int) -> None:
        self.probe = probe
        self.url = probe.http.replace("{port}", str(port)) if probe.http else None
        self.command = [word.replace("{port}", str(port)) for word in probe.command]
        self.ok = 0.0
        self.failures = 0
        self.latency_ms = 0.0
        self.started = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="balloonlab-probe")

    def start(self) -> None:
        self._thread.start()

    def _check(self) -> bool:
        try:
            if self.url:
                with urllib.request.urlopen(self.url, timeout=self.probe.timeout_s) as answer:
                    answer.read()
                    return bool(200 <= answer.status < 400)
            return subprocess.run(self.command, capture_output=True, timeout=self.probe.timeout_s).returncode == 0
        except (OSError, subprocess.SubprocessError, ValueError):
            return False

    def wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._check():
                return True
            time.sleep(0.2)
        return False

    def _run(self) -> None:
        while not self._stop.is_set():
            before = time.perf_counter()
            ok = self._check()
            self.latency_ms = 1000 * (time.perf_counter() - before)
            self.ok = 1.0 if ok else 0.0
            self.failures += not ok
            self._stop.wait(max(0.0, self.probe.every_s - (time.perf_counter() - before)))

    def values(self) -> dict[str, float]:
        return {"probe_ok": self.ok, "probe_failures": float(self.failures), "probe_latency_ms": self.latency_ms}

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.probe.timeout_s + 1)


def _apply(action: Action, lab: Any, guests: Mapping[str, Any]) -> None:
    if action.kind == "host":
        lab.set_host(**{HOST_KEYS[key]: value for key, value in action.value.items()})
        return
    if action.kind == "mark":
        lab.mark(str(action.value))
        return
    guest = guests[str(action.guest)]
    if action.kind == "squeeze_to":
        guest.squeeze(to=action.value, wait=False)
    elif action.kind == "target":
        guest.target(action.value)
    elif action.kind == "shares":
        guest.shares(action.value)
    elif action.kind == "kill_agent":
        guest.kill_agent()
    elif action.kind == "stop_agent":
        import signal

        guest.kill_agent(signal.SIGTERM)
    elif action.kind == "stop":
        guest.stop()


def run_scenario(scenario: Scenario, out_dir: Path, junit_path: Path | None = None,
                 progress: Progress = print) -> ScenarioResult:
    from balloonlab.lab import Lab, LabError, free_loopback_port

    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    junit_path = junit_path or out_dir / "junit.xml"
    host = scenario.host
    lab = Lab(host_memory=_size("[host] memory", host.get("memory", "1GiB")),
              idle_tax=float(host.get("idle_tax", 0.75)),
              sample_period=str(host.get("sample_period", "5s")), balance_period=str(host.get("balance_period", "1s")),
              workdir=out_dir / "lab")
    lab.timeline_path = out_dir / "timeline.jsonl"
    probers: dict[str, _Prober] = {}
    timeline = Timeline()
    try:
        with lab:
            guests = {}
            for definition in scenario.guests:
                port = free_loopback_port()
                if definition.attach:
                    guest = lab.attach(definition.attach, vm_id=definition.name, shares=definition.shares)
                else:
                    command = [word.replace("{port}", str(port)) for word in definition.command]
                    guest = lab.guest(definition.name, command=command or None, phases=definition.phases,
                                      memory=definition.memory_bytes, swap=definition.swap_bytes,
                                      shares=definition.shares)
                guests[definition.name] = guest
                if definition.probe:
                    prober = _Prober(definition.probe, port)
                    if not prober.wait_ready(30):
                        raise ScenarioError(f"guest {definition.name}: its probe never succeeded within 30 s "
                                            f"(log: {guest.log_file})")
                    probers[definition.name] = prober
                progress(f"guest {definition.name} up ({time.monotonic() - started:.1f} s)")
            for prober in probers.values():
                prober.start()
            lab.watch(scenario.sample_interval_s, extra=lambda: {name: p.values() for name, p in probers.items()})
            zero = lab.elapsed_s()
            lab.mark("timeline starts")
            for action in scenario.actions:
                _sleep_until(lab, zero + action.at_s)
                progress(f"{action.at_s:>6.1f} s  {action.describe()}")
                _apply(action, lab, guests)
            _sleep_until(lab, zero + scenario.duration_s)
            lab.mark("timeline ends")
            for prober in probers.values():
                prober.stop()
    except LabError as exc:
        raise ScenarioError(f"{scenario.source}: {exc}") from None
    finally:
        for prober in probers.values():
            prober.stop()
    # The scenario's clock: 0 when the timeline starts.
    timeline.add(Sample(**{**{n: getattr(s, n) for n in s.__dataclass_fields__}, "t_s": round(s.t_s - zero, 3)})
                 for s in lab.timeline.samples if s.t_s >= zero - 1e-9)
    for event in lab.timeline.events:
        timeline.mark(event.t_s - zero, event.text)
    verdicts = [evaluate(assertion, timeline) for assertion in scenario.assertions]
    files = [timeline.write_jsonl(out_dir / "timeline.jsonl"), timeline.write_csv(out_dir / "timeline.csv")]
    if timeline.plot(out_dir / "timeline.png", f"scenario {scenario.name}"):
        files.append(out_dir / "timeline.png")
    wall = time.monotonic() - started
    junit_path.parent.mkdir(parents=True, exist_ok=True)
    junit_path.write_bytes(junit_xml(scenario, verdicts, wall, out_dir / "timeline.jsonl"))
    files.insert(0, junit_path)
    return ScenarioResult(scenario, verdicts, out_dir, junit_path, wall, scenario.duration_s, files)


def _sleep_until(lab: Any, t_s: float) -> None:
    with contextlib.suppress(ValueError):
        while (left := t_s - lab.elapsed_s()) > 0:
            time.sleep(min(left, 0.2))


def run_file(path: Path, out_dir: Path | None = None, junit_path: Path | None = None,
             progress: Progress = print) -> ScenarioResult:
    scenario = load_scenario(path)
    return run_scenario(scenario, out_dir or Path("scenario-results") / scenario.name, junit_path, progress)
