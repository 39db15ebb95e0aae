"""Policy recompute time for 1k, 10k, 100k and 1M vms (goal: 10k < 20 ms, 100k < 300 ms).

    python -m bench policy_bench

Random vms (memsz 256 MiB–4 GiB, shares low/normal/high, active 0–100 %, some reservations),
host memory two thirds of Σ memsz (1.5× overcommit), τ = 0.75, state soft. Times
`compute_targets` (allocation + balloon/swap targets + reasons); median of 5 runs (3 at 1M).
Beside it, a floor in the same run: reading three fields of every vm into numpy arrays and
one sort (the Python-level per-vm cost any recompute over these inputs pays).
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

import numpy as np

from hostd.policy import HostInput, VmInput, compute_targets, resolve_shares

MiB = 256


def make_vms(count: int, rng: random.Random) -> list[VmInput]:
    vms = []
    for index in range(count):
        memsz = rng.choice([256, 512, 1024, 2048, 4096]) * MiB
        vms.append(VmInput(
            vm_id=f"vm{index}", memsz_pages=memsz, shares=resolve_shares(rng.choice(["low", "normal", "high"]), memsz),
            reservation_pages=memsz // 8 if rng.random() < 0.2 else 0, limit_pages=memsz, maxmemctl_pages=None,
            active_ratio=rng.random(), balloon_pages=0, agent_alive=True, agent_refusing=False,
            manual_balloon_pages=None, balloon_target_pages=0,
        ))
    return vms


def run() -> dict[str, Any]:
    rng = random.Random(3)
    rows: list[dict[str, Any]] = []
    for count, goal, repeats in ((1_000, None, 5), (10_000, 20, 5), (100_000, 300, 5), (1_000_000, None, 3)):
        started = time.perf_counter()
        vms = make_vms(count, rng)
        build_s = time.perf_counter() - started
        host = HostInput(host_memory_pages=sum(v.memsz_pages for v in vms) * 2 // 3, idle_tax=0.75)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            compute_targets(host, vms, "soft")
            times.append((time.perf_counter() - started) * 1000)
        floor = []
        for _ in range(repeats):  # the floor: reading each vm's inputs into arrays once, and one sort
            started = time.perf_counter()
            memsz = np.fromiter((v.memsz_pages for v in vms), dtype=np.float64, count=count)
            active = np.fromiter((v.active_ratio for v in vms), dtype=np.float64, count=count)
            np.fromiter((v.shares for v in vms), dtype=np.float64, count=count)
            np.sort(memsz * active)
            floor.append((time.perf_counter() - started) * 1000)
        del vms
        rows.append({"vms": count, "ms_median": round(statistics.median(times), 2), "runs": repeats,
                     "floor_ms": round(statistics.median(floor), 2),
                     "ratio_to_floor": round(statistics.median(times) / statistics.median(floor), 2),
                     "goal_ms": goal, "inputs_build_s": round(build_s, 2),
                     "us_per_vm": round(statistics.median(times) * 1000 / count, 3)})
    met = all(goal is None or median < goal for goal, median in ((r["goal_ms"], r["ms_median"]) for r in rows))
    return {"rows": rows, "goal_met": met}


def report(figures: dict[str, Any]) -> None:
    print("policy: compute_targets (median)")
    print(f"{'vms':>10}{'ms':>10}{'µs/vm':>8}{'floor ms':>10}{'× floor':>9}{'goal ms':>9}")
    for r in figures["rows"]:
        print(f"{r['vms']:>10,}{r['ms_median']:>10.1f}{r['us_per_vm']:>8.2f}{r['floor_ms']:>10.1f}"
              f"{r['ratio_to_floor']:>9.1f}{r['goal_ms'] or '-':>9}")


def main() -> None:
    report(run())
