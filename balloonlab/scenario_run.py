"""Running a scenario file on a real lab: hostd and its guests up, the timeline's actions at
their times, each guest's probe in a thread, then the verdicts (balloonlab/verdicts.py) and the
files: junit.xml, timeline.csv / .jsonl / .png."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from balloonlab.scenario import HOST_KEYS, Action, Probe, Progress, Scenario, ScenarioError, load_scenario, size_setting
from balloonlab.timeline import Sample, Timeline
from balloonlab.verdicts import Verdict, evaluate, junit_xml


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
    from balloonlab.host import free_loopback_port
    from balloonlab.lab import Lab, LabError

    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    junit_path = junit_path or out_dir / "junit.xml"
    host = scenario.host
    lab = Lab(host_memory=size_setting("[host] memory", host.get("memory", "1GiB")),
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
