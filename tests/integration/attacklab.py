"""Measurement harness of the attack tests (and of scripts/attacks/run_attacks.py).

    hostd = HostdProcess(workdir, *ATTACK_HOSTD_FLAGS)
    with HonestAgentProcess(hostd.agent_endpoint, "honest", workdir, duration_s=60) as honest:
        figures = measure(hostd, honest, "S12 varint bombs", lambda: run_attacker(...))
    # figures: honest lock p50/p99/max and timeouts, balloonctl status p50/p99/timeouts, RSS,
    # hostd alive, the honest vm's registration kept (during the attack window only)

Every process started here is stopped by its pid in a finally block. Figures go to stdout and,
when ATTACK_FIGURES is set, are appended to that file as JSON Lines (the runner collects them).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from hostd.client import CtlError, request
from protocol import GetStatus, StatusReply
from tests.integration.hostd_proc import HostdProcess

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
STATUS_TIMEOUT_MS = 3000  # balloonctl's own default: a status not answered within it is a failure
# Every attack hostd: 1 GiB of host memory, reports each second (lost after 3 s of silence),
# targets recomputed each second so that the policy's reaction to an attack shows at once.
ATTACK_HOSTD_FLAGS = ("--host-memory", "1GiB", "--report-interval", "1s", "--balance-period", "1s",
                      "--sample-period", "2s", "--log-level", "WARNING")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def now_ms() -> float:
    return time.monotonic() * 1000


def python_module(module: str, *args: str, stdout: Any = subprocess.PIPE,
                  stderr: Any = None, niceness: int = 0) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", module, *args]
    return subprocess.Popen(["nice", "-n", str(niceness), *command] if niceness else command, cwd=REPO,
                            stdout=stdout, stderr=stderr, text=True)


def stop_process(process: subprocess.Popen[str], timeout_s: float = 10) -> None:
    """SIGTERM, then SIGKILL, by pid (never by name)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def read_line(process: subprocess.Popen[str], timeout_s: float) -> str | None:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout_s)
    return process.stdout.readline().strip() if ready else None


class HonestAgentProcess:
    """tests/integration/simagent.py as its own process; results are read at `finish()`."""

    def __init__(self, endpoint: str, vm_id: str, workdir: Path, duration_s: float = 60,
                 *extra: str) -> None:
        self.out = workdir / f"honest-{vm_id}-{time.monotonic_ns()}.json"
        self.log = workdir / f"honest-{vm_id}.log"
        self._log = self.log.open("a")
        self.process = python_module("tests.integration.simagent", "--endpoint", endpoint, "--vm-id", vm_id,
                                     "--duration", str(duration_s), "--out", str(self.out), *extra,
                                     stderr=self._log)
        self.result: dict[str, Any] | None = None
        line = read_line(self.process, 15)
        if line != "ready":
            self.finish()
            raise AssertionError(f"honest agent never got ready ({line!r}): {self.log.read_text()[-2000:]} "
                                 f"{self.result}")

    def finish(self) -> dict[str, Any]:
        if self.result is None:
            stop_process(self.process)
            self._log.close()
            self.result = json.loads(self.out.read_text()) if self.out.exists() else {"failure": "no result"}
        return self.result

    def __enter__(self) -> HonestAgentProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


def lock_figures(result: dict[str, Any], start_ms: float, end_ms: float) -> dict[str, Any]:
    """The honest agent's round trips sent within [start, end)."""
    window = [(kind, rtt) for t, kind, rtt in result["rtts"] if start_ms <= t < end_ms]
    rtts = [rtt for _kind, rtt in window if rtt is not None]
    errors = [what for t, what in result["errors"] if start_ms <= t < end_ms]
    return {"lock_round_trips": len(window), "lock_timeouts": sum(rtt is None for _k, rtt in window),
            "lock_p50_ms": _round(percentile(rtts, 50)), "lock_p99_ms": _round(percentile(rtts, 99)),
            "lock_max_ms": _round(max(rtts, default=None)), "honest_errors": errors}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


class StatusProbe:
    """Polls `get_status` (what `balloonctl status` sends) every `interval_s`, in a thread."""

    def __init__(self, endpoint: str, interval_s: float = 0.1) -> None:
        self.endpoint = endpoint
        self.interval_s = interval_s
        self.samples: list[tuple[float, float | None]] = []  # (monotonic ms at send, latency ms | None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = now_ms()
            try:
                reply = request(self.endpoint, GetStatus(), STATUS_TIMEOUT_MS)
                latency: float | None = now_ms() - start if isinstance(reply, StatusReply) else None
            except CtlError:
                latency = None
            self.samples.append((start, latency))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> StatusProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=STATUS_TIMEOUT_MS / 1000 + 2)

    def figures(self, start_ms: float, end_ms: float) -> dict[str, Any]:
        window = [latency for t, latency in self.samples if start_ms <= t < end_ms]
        answered = [latency for latency in window if latency is not None]
        return {"status_polls": len(window), "status_timeouts": len(window) - len(answered),
                "status_p50_ms": _round(percentile(answered, 50)), "status_p99_ms": _round(percentile(answered, 99)),
                "status_max_ms": _round(max(answered, default=None))}


def rss_mib(process: subprocess.Popen[str]) -> float:
    return round(psutil.Process(process.pid).memory_info().rss / MiB, 1)


def errors_total(snapshot: dict[str, Any]) -> int:
    return sum(snapshot["host"]["protocol_errors"].values())


def vm_record(snapshot: dict[str, Any], vm_id: str) -> dict[str, Any] | None:
    return next((v for v in snapshot["vms"] if v["vm_id"] == vm_id), None)


def settle(hostd: HostdProcess, timeout_s: float = 90) -> tuple[dict[str, Any] | None, float | None]:
    """The first status hostd answers (and how long after now it came), or None if it died or
    stayed silent for `timeout_s`."""
    start = now_ms()
    while hostd.process.poll() is None and now_ms() - start < timeout_s * 1000:
        try:
            return hostd.status(STATUS_TIMEOUT_MS), round((now_ms() - start) / 1000, 2)
        except (CtlError, AssertionError):
            continue
    return None, None


def measure(hostd: HostdProcess, honest: HonestAgentProcess, name: str, attack: Callable[[], dict[str, Any]],
            baseline_s: float = 1.5, after_s: float = 1.0) -> dict[str, Any]:
    """Baseline, the attack (`attack()` returns its own figures), then a short after window."""
    honest_id = honest.process.args[honest.process.args.index("--vm-id") + 1]
    before = hostd.status()
    resets_before = vm_record(before, honest_id)["resets"]  # type: ignore[index]
    rss_start = rss_mib(hostd.process)
    with StatusProbe(hostd.control_endpoint) as probe:
        t0 = now_ms()
        time.sleep(baseline_s)
        t1 = now_ms()
        attack_figures = attack()
        t2 = now_ms()
        rss_peak_after = rss_mib(hostd.process) if hostd.process.poll() is None else None
        time.sleep(after_s)
        t3 = now_ms()
    after, recovery_s = settle(hostd)
    alive = hostd.process.poll() is None
    honest_vm = vm_record(after, honest_id) if after else None
    figures: dict[str, Any] = {
        "attack": name, "hostd_alive": alive, "attack_s": round((t2 - t1) / 1000, 2),
        "answered_again_after_s": recovery_s,
        "rss_start_mib": rss_start, "rss_end_of_attack_mib": rss_peak_after,
        "rss_after_mib": rss_mib(hostd.process) if alive else None,
        "honest_registered": bool(honest_vm and honest_vm["alive"]),
        "honest_resets": None if honest_vm is None else honest_vm["resets"] - resets_before,
        "honest_ledger_bytes": None if honest_vm is None else honest_vm["ledger_bytes"],
        "errors_counted": None if after is None else errors_total(after) - errors_total(before),
        **attack_figures,
        "baseline": {**probe.figures(t0, t1)},
        "during": {**probe.figures(t1, t2)},
        "after": {**probe.figures(t2, t3)},
        "_windows": (t0, t1, t2, t3),
    }
    return figures


def complete(figures: dict[str, Any], honest: dict[str, Any]) -> dict[str, Any]:
    """Fill in the honest agent's round trips per window once its result is in."""
    t0, t1, t2, t3 = figures.pop("_windows")
    for window, (start, end) in (("baseline", (t0, t1)), ("during", (t1, t2)), ("after", (t2, t3))):
        figures[window].update(lock_figures(honest, start, end))
    figures["honest_registrations"] = honest.get("registrations")
    figures["honest_not_registered"] = honest.get("not_registered")
    return figures


def report(figures: dict[str, Any]) -> None:
    """Printed (pytest -s or on failure) and collected by the runner."""
    line = json.dumps(figures, separators=(",", ":"), default=str)
    print(f"FIGURES {line}")
    target = os.environ.get("ATTACK_FIGURES")
    if target:
        with open(target, "a") as out:
            out.write(line + "\n")


def run_attacker(*args: str, timeout_s: float = 60) -> dict[str, Any]:
    """tests/integration/attackers.py in its own process; its last stdout line is its JSON summary."""
    process = python_module("tests.integration.attackers", *args, stderr=subprocess.PIPE)
    try:
        out, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_process(process)
        raise AssertionError(f"attacker {args[0]} did not stop within {timeout_s} s") from None
    finally:
        stop_process(process)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        raise AssertionError(f"attacker {args[0]} failed (rc {process.returncode}): {err[-3000:]}")
    return json.loads(lines[-1])


def run_attackers(commands: list[list[str]], timeout_s: float = 60, niceness: int = 0) -> list[dict[str, Any]]:
    """Several attacker processes at once (each in its own process), their summaries in order."""
    processes = [python_module("tests.integration.attackers", *args, stderr=subprocess.PIPE, niceness=niceness)
                 for args in commands]
    summaries = []
    try:
        deadline = time.monotonic() + timeout_s
        for args, process in zip(commands, processes, strict=True):
            try:
                out, err = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"attacker {args[0]} did not stop within {timeout_s} s") from None
            lines = [line for line in out.splitlines() if line.startswith("{")]
            if process.returncode != 0 or not lines:
                raise AssertionError(f"attacker {args[0]} failed (rc {process.returncode}): {err[-3000:]}")
            summaries.append(json.loads(lines[-1]))
    finally:
        for process in processes:
            stop_process(process)
    return summaries


@contextlib.contextmanager
def hostd_running(workdir: Path, *flags: str) -> Iterator[HostdProcess]:
    hostd = HostdProcess(workdir, *flags)
    try:
        yield hostd
    finally:
        hostd.stop()
