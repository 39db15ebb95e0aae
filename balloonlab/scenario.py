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

This module reads the file; balloonlab/verdicts.py judges a timeline against its assertions
(pure) and balloonlab/scenario_run.py runs it on a real lab.
"""

from __future__ import annotations

import operator
import re
import shlex
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from balloonlab.timeline import SAMPLE_FIELDS
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


def size_setting(where: str, value: object) -> int:
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
    return GuestDef(name, size_setting(f"{where} memory", table.get("memory", "256MiB")),
                    size_setting(f"{where} swap", table.get("swap", "256MiB")),
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
                    converted[key] = size_setting(f"{where} host.memory", raw)
                elif key.endswith("period"):
                    converted[key] = int(_seconds(f"{where} host.{key}", raw) * 1000)
                else:
                    converted[key] = raw
            value = converted
        return Action(at, None, kind, value)
    if guest not in names:
        raise ScenarioError(f"{where}: guest = {guest!r} is not one of the scenario's guests {sorted(names)}")
    if kind == "squeeze_to":
        value = size_setting(f"{where} squeeze_to", value)
    elif kind == "target":
        value = None if value == "auto" else size_setting(f"{where} target", value)
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
            size_setting(f"{where} value", raw))
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
