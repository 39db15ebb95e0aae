"""Relief under pressure (root: memory cgroups; swap for the swap-on half). Issue 18 item 2.

    python -m bench relief_bench [--json]      [BENCH_RUNS=10]

A 512 MiB guest (memory cgroup) runs the real agent (MiniHost on loopback) and a workload
holding 64 MiB. Then the workload suddenly needs 256 MiB more: it maps and writes them
(memset, as a program filling a new buffer), timed inside it. Two cases, alternating run by
run, each run in a fresh guest:

- ballooned: the host holds the balloon at 256 MiB (and never lowers it: the relief is the
  agent's own), so 64 + 256 + 256 MiB + the agent cannot all fit;
- no balloon: the same guest and agent with a target of 0.

Per case: the allocation time (median, p90, max), the guest's major faults and OOM kills
during it, and what the balloon gave back. Swap on (512 MiB of swap for the guest) and swap
off (memsw = the limit). Goal: ballooned / no balloon ≤ 1.25, OOM kills 0.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

MiB = 1 << 20
GUEST = 512 * MiB
BASE = 64 * MiB
GROWTH = 256 * MiB
BALLOON = 256 * MiB

WORKLOAD = r"""
import ctypes, json, mmap, sys, time
base = mmap.mmap(-1, int(sys.argv[1]))
ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(base)), 1, len(base))
print("ready", flush=True)
sys.stdin.readline()
t0 = time.perf_counter()
grown = mmap.mmap(-1, int(sys.argv[2]))
ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(grown)), 1, len(grown))
print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
sys.stdin.readline()
"""


def one_run(context: Any, swap: bool, ballooned: bool, log: Any = None) -> dict[str, Any]:
    """One fresh guest; `log`: a file for the agent's INFO log (default: no log)."""
    from tests.integration.cgroups import TestCgroup
    from tests.integration.minihost import MiniHost

    host = MiniHost(context, report_interval_ms=200)
    cgroup = TestCgroup(GUEST, GUEST if swap else 0)
    try:
        agent = cgroup.python("-m", "guestagent", "--vm-id", "relief", "--host-endpoint", host.endpoint,
                              "--cgroup-path", str(cgroup.path), "--report-interval", "200ms",
                              "--log-level", "INFO" if log else "WARNING", "--want-pfn", "false",
                              stderr=log or subprocess.DEVNULL)
        workload = cgroup.python("-c", WORKLOAD, str(BASE), str(GROWTH), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE)
        assert workload.stdout is not None and workload.stdin is not None
        assert workload.stdout.readline().strip() == "ready"
        host.pump(lambda: bool(host.welcomes), 20, "welcome")
        target = BALLOON // 4096 if ballooned else 0
        host.set_target("relief", target)
        host.pump(lambda: (s := host.last_status()) is not None and s.balloon_pages == target
                  and len(host.ledger[b"relief"]) == target, 60, "the balloon at its target")
        time.sleep(0.3)  # a quiet guest before the growth
        faults, ooms = cgroup.major_faults(), cgroup.oom_kills()
        workload.stdin.write("go\n")
        workload.stdin.flush()
        line: list[str] = []
        # Keep answering the agent's locks/unlocks while the workload grows.
        host.pump(lambda: workload.poll() is not None or bool(line) or bool(_ready(workload, line)), 60,
                  "the allocation", poll_ms=1)
        seconds = json.loads(line[0])["seconds"] if line and line[0].strip() else None
        reports = len(host.statuses)
        host.pump(lambda: len(host.statuses) >= reports + 2, 5, "a fresh report")
        status = host.last_status()
        result = {
            "seconds": seconds,
            "workload_killed": workload.poll() is not None and seconds is None,
            "agent_killed": agent.poll() is not None,
            "major_faults": cgroup.major_faults() - faults,
            "oom_kills": cgroup.oom_kills() - ooms,
            "balloon_after_mib": (status.balloon_pages * 4096 / MiB) if status else None,
            "swap_used_mib": cgroup.swap_bytes() / MiB,
        }
        if workload.poll() is None:
            workload.stdin.write("done\n")
            workload.stdin.flush()
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=10)
        return result
    finally:
        cgroup.destroy()
        host.close()


def _ready(process: subprocess.Popen[str], out: list[str]) -> bool:
    import select

    assert process.stdout is not None
    if select.select([process.stdout], [], [], 0)[0]:
        out.append(process.stdout.readline())
        return True
    return False


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    times = sorted(r["seconds"] for r in runs if r["seconds"] is not None)
    return {
        "runs": len(runs),
        "completed": len(times),
        "seconds_median": round(statistics.median(times), 4) if times else None,
        "seconds_p90": round(times[min(len(times) - 1, int(0.9 * len(times)))], 4) if times else None,
        "seconds_max": round(times[-1], 4) if times else None,
        "major_faults_median": statistics.median(r["major_faults"] for r in runs),
        "major_faults_max": max(r["major_faults"] for r in runs),
        "oom_kills": sum(r["oom_kills"] for r in runs),
        "workloads_killed": sum(r["workload_killed"] for r in runs),
        "agents_killed": sum(r["agent_killed"] for r in runs),
        "balloon_after_mib_median": statistics.median(r["balloon_after_mib"] or 0 for r in runs),
    }


def measure(runs: int, swap_modes: tuple[bool, ...]) -> dict[str, Any]:
    import zmq

    context = zmq.Context()
    figures: dict[str, Any] = {"runs_per_case": runs, "guest_mib": GUEST // MiB, "base_mib": BASE // MiB,
                               "growth_mib": GROWTH // MiB, "balloon_mib": BALLOON // MiB, "goal_ratio": 1.25}
    try:
        for swap in swap_modes:
            cases: dict[str, list[dict[str, Any]]] = {"ballooned": [], "no_balloon": []}
            for _ in range(runs):
                cases["no_balloon"].append(one_run(context, swap, ballooned=False))
                cases["ballooned"].append(one_run(context, swap, ballooned=True))
            mode = "swap_on" if swap else "swap_off"
            summaries = {case: _summary(results) for case, results in cases.items()}
            figures[mode] = summaries
            figures[f"{mode}_samples"] = {case: [r["seconds"] for r in results] for case, results in cases.items()}
            b, n = summaries["ballooned"]["seconds_median"], summaries["no_balloon"]["seconds_median"]
            figures[f"{mode}_ratio"] = round(b / n, 3) if b and n else None
            figures[f"{mode}_goal_met"] = (figures[f"{mode}_ratio"] is not None and figures[f"{mode}_ratio"] <= 1.25
                                           and summaries["ballooned"]["oom_kills"] == 0
                                           and summaries["ballooned"]["completed"] == runs)
    finally:
        context.destroy(linger=0)
    return figures


def run() -> dict[str, Any]:
    if os.geteuid() != 0:
        return {"skipped": "needs root (memory cgroups, mlock)"}
    from cgroups import host_swap_total_bytes

    modes = (True, False) if host_swap_total_bytes() >= GUEST else (False,)
    return measure(int(os.environ.get("BENCH_RUNS", "10")), modes)


def report(figures: dict[str, Any]) -> None:
    if "skipped" in figures:
        print(f"relief_bench: {figures['skipped']}", file=sys.stderr)
        return
    print(f"relief: a {figures['guest_mib']} MiB guest holding {figures['base_mib']} MiB suddenly needs "
          f"{figures['growth_mib']} MiB more; balloon {figures['balloon_mib']} MiB vs none, "
          f"{figures['runs_per_case']} runs each")
    print(f"{'case':<22}{'done':>6}{'median s':>10}{'p90 s':>8}{'max s':>8}{'majflt':>8}{'OOM':>5}"
          f"{'balloon after':>15}")
    for mode in ("swap_on", "swap_off"):
        if mode not in figures:
            continue
        for case, row in figures[mode].items():
            print(f"{mode + ' ' + case:<22}{row['completed']:>6}{row['seconds_median'] or 0:>10.3f}"
                  f"{row['seconds_p90'] or 0:>8.3f}{row['seconds_max'] or 0:>8.3f}{row['major_faults_median']:>8}"
                  f"{row['oom_kills']:>5}{row['balloon_after_mib_median']:>12.0f} MiB")
        print(f"{mode}: ballooned / no balloon = {figures[f'{mode}_ratio']} (goal ≤ 1.25, OOM 0): "
              f"{'met' if figures[f'{mode}_goal_met'] else 'missed'}")


def main() -> None:
    report(run())
