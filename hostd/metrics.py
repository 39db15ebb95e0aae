"""Prometheus metrics from a hostd snapshot (`HostCore.snapshot`): a pure function from the
snapshot to metric families, so `/metrics` shows exactly what `balloonctl status --json` does.

Names follow Prometheus conventions: `balloonlab_` prefix, base units (`_bytes`, `_seconds`,
`_ratio`), `_total` for counters, a `vm` label per guest."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, cast

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hostd.status_doc import StatusDocument

STATES = ("high", "soft", "hard", "low")

# snapshot field → (metric name, help); per-vm gauges
_VM_GAUGES = (
    ("memsz_bytes", "balloonlab_vm_memsz_bytes", "Guest memory size (its cgroup limit): esxtop MEMSZ"),
    ("granted_bytes", "balloonlab_vm_granted_bytes", "Memory the guest uses beyond its balloon: GRANT"),
    ("consumed_bytes", "balloonlab_vm_consumed_bytes", "Guest cgroup usage, balloon included"),
    ("alloc_target_bytes", "balloonlab_vm_alloc_target_bytes", "Allocation the policy gives the guest: SZTGT"),
    ("active_bytes", "balloonlab_vm_active_bytes", "Working-set estimate: TCHD"),
    ("active_ratio", "balloonlab_vm_active_ratio", "Working-set estimate as a fraction of memsz: %ACTV/100"),
    ("balloon_bytes", "balloonlab_vm_balloon_bytes", "Balloon the agent holds: MCTLSZ"),
    ("balloon_target_bytes", "balloonlab_vm_balloon_target_bytes", "Balloon target: MCTLTGT"),
    ("balloon_max_bytes", "balloonlab_vm_balloon_max_bytes", "Balloon cap: MCTLMAX"),
    ("swap_current_bytes", "balloonlab_vm_swap_bytes", "Guest swap in use: SWCUR"),
    ("swap_target_bytes", "balloonlab_vm_swap_target_bytes", "What the balloon cannot cover: SWTGT"),
    ("shares", "balloonlab_vm_shares", "Shares"),
    ("vswap_limit_bytes", "balloonlab_vm_host_limit_bytes",
     "Memory limit hostd imposes on the guest's cgroup to apply SWTGT (absent: the guest's own limit)"),
)
_VM_COUNTERS = (
    ("inflated_pages", "balloonlab_vm_inflated_pages", "Pages locked into the balloon (this registration)"),
    ("deflated_pages", "balloonlab_vm_deflated_pages", "Pages unlocked from the balloon (this registration)"),
    ("refused_pages", "balloonlab_vm_refused_pages", "Pages the host refused in lock batches"),
    ("lock_batches", "balloonlab_vm_lock_batches", "Lock batches received"),
    ("unlock_batches", "balloonlab_vm_unlock_batches", "Unlock batches received"),
    ("resets", "balloonlab_vm_resets", "Ledger resets after a mismatch"),
)
_WORKLOAD_GAUGES = (
    ("touches_per_s", "balloonlab_vm_workload_touches_per_second", "The guest workload's page touches per second"),
    ("latency_p99_us", "balloonlab_vm_workload_touch_latency_p99_seconds", "The workload's p99 touch latency"),
)


def metric_families(snapshot: StatusDocument) -> list[Metric]:
    host = snapshot["host"]
    families: list[Metric] = []

    def gauge(name: str, text: str, value: float) -> None:
        families.append(GaugeMetricFamily(name, text, value=value))

    gauge("balloonlab_host_memory_bytes", "Memory the guests share", host["host_memory_bytes"])
    gauge("balloonlab_host_free_bytes", "Host memory minus all grants (negative: overcommitted)", host["free_bytes"])
    gauge("balloonlab_host_granted_bytes", "Sum of the guests' grants", host["granted_bytes"])
    gauge("balloonlab_host_idle_tax_ratio", "The idle memory tax τ", host["idle_tax_ratio"])
    gauge("balloonlab_host_vms_alive",
          "Guests hostd schedules now (a live agent, or agentless with a cgroup or container)", host["vms_alive"])
    thresholds = GaugeMetricFamily("balloonlab_host_free_threshold_bytes",
                                   "Free memory below which the state drops (high = minFree)", labels=["state"])
    for level in STATES:
        thresholds.add_metric([level], cast(Mapping[str, int], host["thresholds_bytes"])[level])
    families.append(thresholds)
    state = GaugeMetricFamily("balloonlab_host_state", "1 for the current free-memory state", labels=["state"])
    for name in STATES:
        state.add_metric([name], 1.0 if host["state"] == name else 0.0)
    families.append(state)
    errors = CounterMetricFamily("balloonlab_protocol_errors", "Frames refused, by error code", labels=["code"])
    for code, count in sorted(host["protocol_errors"].items()):
        errors.add_metric([code], count)
    families.append(errors)
    counters = host["counters"]
    for key, name, text in (("agents_lost", "balloonlab_agents_lost", "Agents marked lost (silent too long)"),
                            ("agents_left", "balloonlab_agents_left", "Agents that said bye"),
                            ("resets", "balloonlab_ledger_resets", "Ledger resets, all guests"),
                            ("vswap_limit_changes", "balloonlab_host_limit_changes",
                             "Cgroup limit changes made for host swap"),
                            ("blocks", "balloonlab_blocks", "Guests frozen in the low state"),
                            ("host_action_failures", "balloonlab_host_action_failures",
                             "Cgroup limit or freezer writes that failed")):
        families.append(CounterMetricFamily(name, text, value=counters.get(key, 0)))

    vms = [cast(Mapping[str, Any], vm) for vm in snapshot["vms"]]  # read by key name below
    for key, name, text in _VM_GAUGES:
        family = GaugeMetricFamily(name, text, labels=["vm"])
        for vm in vms:
            if vm.get(key) is not None:
                family.add_metric([vm["vm_id"]], vm[key])
        families.append(family)
    alive = GaugeMetricFamily("balloonlab_vm_alive",
                              "1 while hostd schedules the guest (has_agent: whether an agent serves it)",
                              labels=["vm"])
    for vm in vms:
        alive.add_metric([vm["vm_id"]], 1.0 if vm["alive"] else 0.0)
    families.append(alive)
    for key, name, text in (("has_agent", "balloonlab_vm_has_agent", "1 while a balloon agent serves the guest"),
                            ("frozen", "balloonlab_vm_blocked", "1 while hostd keeps the guest frozen (low state)")):
        flag = GaugeMetricFamily(name, text, labels=["vm"])
        for vm in vms:
            flag.add_metric([vm["vm_id"]], 1.0 if vm.get(key) else 0.0)
        families.append(flag)
    for key, name, text in _VM_COUNTERS:
        counter = CounterMetricFamily(name, text, labels=["vm"])
        for vm in vms:
            counter.add_metric([vm["vm_id"]], vm.get(key) or 0)
        families.append(counter)
    for key, name, text in _WORKLOAD_GAUGES:
        family = GaugeMetricFamily(name, text, labels=["vm"])
        for vm in vms:
            value = vm["workload"].get(key)
            if value is not None:
                family.add_metric([vm["vm_id"]], value / 1e6 if key.endswith("_us") else value)
        families.append(family)
    return families


class SnapshotCollector(Collector):
    """For a prometheus_client registry: the families of whatever snapshot `source` returns."""

    def __init__(self, source: Any) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        snapshot = self._source()
        if snapshot is not None:
            yield from metric_families(snapshot)
