"""The guest agent at the limit (root: makes memory cgroups). Issue 18 item 1.

    python -m bench agent_bench [--json]      [BENCH_ROUNDS=5]

Each agent in its own 3 GiB memory cgroup with free memory (BENCH_SHARED_CGROUP=1: all in
one, as before session 9), the raw runs in the VPN agent's; alternating round by round:

- raw 4 KiB: a process in the cgroup maps 1 GiB and mlocks it in one call (timed inside it),
  then munlock + MADV_DONTNEED of the whole GiB (the raw deflate); and the same mlocking
  16 MiB per call (the agent's chunk): on this machine neither is reliably faster, so the
  agent is compared with the faster median of the two ("best raw");
- raw THP: the same after MADV_HUGEPAGE (what a raw pin gets from 2 MiB pages);
- the whole agent, VPN page numbers: set_target(1 GiB) → every page in the host's ledger, then
  set_target(0) → the agent's VmLck 0 (memory back in the guest; "settled": the host's
  ledger empty too);
- the whole agent with --huge-pages (2 MiB THP batches), and with PFN page numbers.

The host is MiniHost on loopback with a counting ledger (pages per vm, as hostd's interval
ledger costs O(log n) a range; MiniHost's page sets cost the bench host more than the agent).
Medians of BENCH_ROUNDS rounds; ratios are raw / agent (≥ 1 = the agent is as fast).
Then set_target → first lock frame at the host over BENCH_LOCK_SAMPLES (300) small target changes
(with 100, the p99 was the second-worst sample: one scheduler hiccup on a shared machine).

Why a cgroup per agent: an agent samples the working set of every other process in its
cgroup (smaps_rollup each report, clear_refs each period). With three agents in one cgroup,
two of them read the measured agent's smaps_rollup 5 times a second each, a walk of its page
tables under its mmap lock (~11 ms per 512 MiB held) that its mlock and munlock wait for: the
measured agent paid for being the others' workload, which no guest has (one agent each).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

ONE_GIB = 1 << 30
PAGES = ONE_GIB // 4096

RAW_IN_CGROUP = r"""
import ctypes, ctypes.util, json, sys, time
libc = ctypes.CDLL(ctypes.util.find_library('c'), use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
for name in ('mlock', 'munlock'):
    getattr(libc, name).argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
size, huge = 1 << 30, 2 << 20
a = libc.mmap(None, size + huge, 3, 0x22 | 0x4000, -1, 0)
a = (a + huge - 1) & ~(huge - 1)
if sys.argv[1] == 'thp':
    assert libc.madvise(a, size, 14) == 0
chunk = int(sys.argv[2]) << 20 or size
t0 = time.perf_counter()
for off in range(0, size, chunk):
    assert libc.mlock(a + off, chunk) == 0
t1 = time.perf_counter()
libc.munlock(a, size); libc.madvise(a, size, 4); t2 = time.perf_counter()
print(json.dumps({'inflate_s': t1 - t0, 'deflate_s': t2 - t1}))
"""


def _counting_host(context: Any, report_interval_ms: int) -> Any:
    from protocol import Lock, LockResult, RangeResult, RangeStatus, Unlock, UnlockResult
    from tests.integration.minihost import MiniHost

    class CountingHost(MiniHost):
        """MiniHost whose ledger is a page count per vm: every lock is accepted (the agent
        never sends overlapping ones), every unlock removes its pages."""

        def __init__(self) -> None:
            super().__init__(context, report_interval_ms=report_interval_ms)
            self.pages: dict[str, int] = {}

        def handle(self, route: bytes, seq: int, message: Any) -> None:
            vm_id = self.routes.get(route)
            if vm_id is None or not isinstance(message, Lock | Unlock):
                super().handle(route, seq, message)
                return
            identity = vm_id.encode()
            target, target_seq = self.target_pages.get(identity, 0), self.vm_target_seq.get(identity, 0)
            results = tuple(RangeResult(start=start, count=count, status=RangeStatus.OK)
                            for start, count in message.pages.ranges)
            if isinstance(message, Lock):
                self.lock_frames += 1
                self.pages[vm_id] = self.pages.get(vm_id, 0) + message.pages.page_count
                self._reply(route, LockResult(results=results, target_pages=target, target_seq=target_seq), seq)
            else:
                self.unlock_frames += 1
                self.pages[vm_id] = self.pages.get(vm_id, 0) - message.pages.page_count
                self._reply(route, UnlockResult(results=results, target_pages=target, target_seq=target_seq), seq)

    return CountingHost()


def _vm_locked_bytes(pid: int) -> int:
    from tests.integration.cgroups import vm_locked_bytes

    return vm_locked_bytes(pid)


def measure(rounds: int) -> dict[str, Any]:
    import zmq

    from tests.integration.cgroups import TestCgroup

    context = zmq.Context()
    host = _counting_host(context, report_interval_ms=200)
    shared = os.environ.get("BENCH_SHARED_CGROUP") == "1"
    cgroup = TestCgroup(3 * ONE_GIB, 0)  # the raw runs' and the VPN agent's
    cgroups = [cgroup]
    samples: dict[str, list[float]] = {}
    latencies_ms: list[float] = []

    def add(name: str, value: float) -> None:
        samples.setdefault(name, []).append(value)

    def raw(mode: str, chunk_mib: int = 0) -> dict[str, float]:
        out = cgroup.python("-c", RAW_IN_CGROUP, mode, str(chunk_mib), stdout=subprocess.PIPE)
        return dict(json.loads(out.communicate(timeout=120)[0]))

    agents = {"agent_vpn": ("--want-pfn", "false"), "agent_thp": ("--want-pfn", "false", "--huge-pages", "true"),
              "agent_pfn": ("--want-pfn", "true")}
    baseline_src = os.environ.get("BENCH_BASELINE_SRC")  # another checkout's agent, e.g. before a change
    ab_only = bool(baseline_src) and os.environ.get("BENCH_AB_ONLY") == "1"  # raw, agent, baseline only
    if baseline_src:
        agents["agent_base"] = ("--want-pfn", "false")
    pids: dict[str, int] = {}
    try:
        raw("4k")  # warm-up: the hypervisor backs this memory once
        for name, flags in agents.items():
            own = cgroup
            if not shared and name != "agent_vpn":
                own = TestCgroup(3 * ONE_GIB, 0)
                cgroups.append(own)
            process = own.python("-m", "guestagent", "--vm-id", name, "--host-endpoint", host.endpoint,
                                 "--cgroup-path", str(own.path), "--report-interval", "200ms",
                                 "--log-level", "WARNING", *flags, stderr=subprocess.DEVNULL,
                                 cwd=baseline_src if name == "agent_base" else None)
            pids[name] = process.pid
        host.pump(lambda: len(host.welcomes) == len(agents), 20, "the agents welcomed")

        def agent_round(name: str) -> None:
            started = time.perf_counter()
            host.set_target(name, PAGES)
            host.pump(lambda: host.pages.get(name) == PAGES, 120, f"{name}: 1 GiB in the ledger", poll_ms=1)
            add(f"{name}_inflate_s", time.perf_counter() - started)
            started = time.perf_counter()
            host.set_target(name, 0)
            host.pump(lambda: _vm_locked_bytes(pids[name]) == 0, 120, f"{name}: memory back", poll_ms=1)
            add(f"{name}_deflate_s", time.perf_counter() - started)
            host.pump(lambda: host.pages.get(name) == 0, 120, f"{name}: ledger empty", poll_ms=1)
            add(f"{name}_deflate_settled_s", time.perf_counter() - started)

        for _ in range(rounds):
            for key, value in raw("4k").items():
                add(f"raw_4k_{key}", value)
            agent_round("agent_vpn")
            if baseline_src:
                agent_round("agent_base")
            if ab_only:
                continue
            for key, value in raw("4k", 16).items():
                add(f"raw_4k_16m_{key}", value)
            for key, value in raw("thp").items():
                add(f"raw_thp_{key}", value)
            agent_round("agent_thp")
            agent_round("agent_pfn")
        if ab_only:
            return _ab_figures(samples, rounds, baseline_src)
        # Reaction time: alternate one batch out and back in around 512 MiB.
        host.set_target("agent_vpn", PAGES // 2)
        host.pump(lambda: host.pages.get("agent_vpn") == PAGES // 2, 60, "512 MiB", poll_ms=1)
        for index in range(int(os.environ.get("BENCH_LOCK_SAMPLES", "300"))):
            target = PAGES // 2 - 512 * (1 + index % 2)
            frames_before = host.lock_frames + host.unlock_frames
            host.set_target("agent_vpn", target)
            sent = host.target_sent_at[host.target_seq]
            host.pump(lambda f=frames_before: host.lock_frames + host.unlock_frames != f, 5, "movement", poll_ms=1)
            latencies_ms.append((time.perf_counter() - sent) * 1000)
            host.pump(lambda t=target: host.pages.get("agent_vpn") == t, 5, "settle", poll_ms=1)
    finally:
        for each in cgroups:
            each.destroy()
        host.close()
        context.destroy(linger=0)
    med = {name: statistics.median(values) for name, values in samples.items()}
    latencies_ms.sort()
    figures: dict[str, Any] = {"rounds": rounds, "shared_cgroup": shared,
                               "samples": {k: [round(x, 4) for x in v] for k, v in samples.items()}}
    figures.update({f"median_{name}": round(value, 4) for name, value in med.items()})
    best_raw = min(med["raw_4k_inflate_s"], med["raw_4k_16m_inflate_s"])
    figures["median_best_raw_4k_inflate_s"] = round(best_raw, 4)
    figures["ratio_agent_vpn_vs_raw_4k"] = round(best_raw / med["agent_vpn_inflate_s"], 3)
    figures["ratio_agent_vpn_vs_raw_4k_one_call"] = round(med["raw_4k_inflate_s"] / med["agent_vpn_inflate_s"], 3)
    figures["ratio_agent_pfn_vs_raw_4k"] = round(best_raw / med["agent_pfn_inflate_s"], 3)
    if baseline_src:
        figures["baseline_src"] = baseline_src
        figures["ratio_agent_base_vs_raw_4k"] = round(best_raw / med["agent_base_inflate_s"], 3)
        figures["ratio_deflate_agent_base_vs_raw"] = round(med["raw_4k_deflate_s"] / med["agent_base_deflate_s"], 3)
    figures["ratio_agent_thp_vs_raw_4k"] = round(best_raw / med["agent_thp_inflate_s"], 3)
    figures["ratio_agent_thp_vs_raw_thp"] = round(med["raw_thp_inflate_s"] / med["agent_thp_inflate_s"], 3)
    figures["ratio_deflate_agent_vpn_vs_raw"] = round(med["raw_4k_deflate_s"] / med["agent_vpn_deflate_s"], 3)
    figures["ratio_deflate_agent_thp_vs_raw_thp"] = round(med["raw_thp_deflate_s"] / med["agent_thp_deflate_s"], 3)
    # Per round, so that a noisy round (the machine is shared) shows as spread, not as a shift.
    raw_rounds = [min(a, b) for a, b in zip(samples["raw_4k_inflate_s"], samples["raw_4k_16m_inflate_s"], strict=True)]
    figures["ratio_agent_vpn_per_round"] = [round(r / a, 3) for r, a in
                                            zip(raw_rounds, samples["agent_vpn_inflate_s"], strict=True)]
    figures["first_lock_ms_p50"] = round(latencies_ms[len(latencies_ms) // 2], 3)
    figures["first_lock_ms_p99"] = round(latencies_ms[int(len(latencies_ms) * 0.99) - 1], 3)
    figures["first_lock_ms_max"] = round(latencies_ms[-1], 3)
    figures["goal_inflate_ratio"] = 0.95
    figures["goal_met"] = figures["ratio_agent_vpn_vs_raw_4k"] >= 0.95
    return figures


def _ab_figures(samples: dict[str, list[float]], rounds: int, baseline_src: str | None) -> dict[str, Any]:
    med = {name: statistics.median(values) for name, values in samples.items()}
    return {"rounds": rounds, "baseline_src": baseline_src,
            "samples": {k: [round(x, 4) for x in v] for k, v in samples.items()},
            **{f"median_{name}": round(value, 4) for name, value in med.items()},
            "ratio_agent_vpn_vs_raw_4k": round(med["raw_4k_inflate_s"] / med["agent_vpn_inflate_s"], 3),
            "ratio_agent_base_vs_raw_4k": round(med["raw_4k_inflate_s"] / med["agent_base_inflate_s"], 3),
            "ratio_deflate_agent_vpn_vs_raw": round(med["raw_4k_deflate_s"] / med["agent_vpn_deflate_s"], 3),
            "ratio_deflate_agent_base_vs_raw": round(med["raw_4k_deflate_s"] / med["agent_base_deflate_s"], 3),
            "wins_agent_vs_base_inflate": sum(a < b for a, b in zip(samples["agent_vpn_inflate_s"],
                                                                    samples["agent_base_inflate_s"], strict=True))}


def run() -> dict[str, Any]:
    if os.geteuid() != 0:
        return {"skipped": "needs root (memory cgroup, mlock of 1 GiB)"}
    return measure(int(os.environ.get("BENCH_ROUNDS", "5")))


def report(figures: dict[str, Any]) -> None:
    if "skipped" in figures:
        print(f"agent_bench: {figures['skipped']}", file=sys.stderr)
        return
    if "wins_agent_vs_base_inflate" in figures:
        print(json.dumps(figures, indent=1))
        return
    print(f"agent: 1 GiB in a 3 GiB cgroup with free memory, median of {figures['rounds']} alternating rounds")
    print(f"{'what':<44}{'inflate s':>10}{'deflate s':>10}{'settled s':>10}")
    for label, key in (("raw mmap+mlock, 4 KiB (one call)", "raw_4k"), ("raw, 4 KiB, 16 MiB per mlock", "raw_4k_16m"),
                       ("raw mmap+MADV_HUGEPAGE+mlock", "raw_thp"),
                       ("agent, VPN page numbers", "agent_vpn"), ("agent, PFN page numbers", "agent_pfn"),
                       ("agent, --huge-pages (THP batches)", "agent_thp"), ("baseline agent (VPN)", "agent_base")):
        if f"median_{key}_inflate_s" not in figures:
            continue
        settled = figures.get(f"median_{key}_deflate_settled_s")
        print(f"{label:<44}{figures[f'median_{key}_inflate_s']:>10.3f}{figures[f'median_{key}_deflate_s']:>10.3f}"
              f"{'' if settled is None else format(settled, '.3f'):>10}")
    print(f"inflate best raw/agent: VPN {figures['ratio_agent_vpn_vs_raw_4k']} (goal ≥ 0.95; per round "
          f"{figures['ratio_agent_vpn_per_round']}), PFN {figures['ratio_agent_pfn_vs_raw_4k']}, "
          f"THP vs raw 4 KiB {figures['ratio_agent_thp_vs_raw_4k']}, "
          f"THP vs raw THP {figures['ratio_agent_thp_vs_raw_thp']}")
    print(f"deflate raw/agent: VPN {figures['ratio_deflate_agent_vpn_vs_raw']}, "
          f"THP {figures['ratio_deflate_agent_thp_vs_raw_thp']}")
    print(f"set_target → first lock/unlock at the host: p50 {figures['first_lock_ms_p50']} ms, "
          f"p99 {figures['first_lock_ms_p99']} ms, max {figures['first_lock_ms_max']} ms")


def main() -> None:
    report(run())
