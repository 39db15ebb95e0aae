"""Policy recompute time for 1k, 10k and 100k vms (goal: 10k < 20 ms, 100k < 300 ms).

    python -m bench policy_bench

Random vms (memsz 256 MiB–4 GiB, shares low/normal/high, active 0–100 %, some reservations),
host memory two thirds of Σ memsz (1.5× overcommit), τ = 0.75, state soft. Times
`compute_targets` (allocation + balloon/swap targets + reasons); median of 5 runs.
"""

from __future__ import annotations

import random
import statistics
import time

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


def main() -> None:
    rng = random.Random(3)
    print("policy: compute_targets (median of 5)")
    print(f"{'vms':>8}{'ms':>10}{'goal ms':>9}")
    for count, goal in ((1_000, None), (10_000, 20), (100_000, 300)):
        vms = make_vms(count, rng)
        host = HostInput(host_memory_pages=sum(v.memsz_pages for v in vms) * 2 // 3, idle_tax=0.75)
        times = []
        for _ in range(5):
            started = time.perf_counter()
            compute_targets(host, vms, "soft")
            times.append((time.perf_counter() - started) * 1000)
        print(f"{count:>8,}{statistics.median(times):>10.1f}{goal if goal else '-':>9}")
