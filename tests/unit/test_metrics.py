"""/metrics from a snapshot: names, labels, values, and the exposition format parsed back."""

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from hostd.metrics import SnapshotCollector, metric_families

MiB = 1 << 20


def vm(vm_id: str, **overrides):
    base = {"vm_id": vm_id, "alive": True, "memsz_bytes": 512 * MiB, "granted_bytes": 300 * MiB,
            "consumed_bytes": 400 * MiB, "alloc_target_bytes": 350 * MiB, "active_bytes": 200 * MiB,
            "active_ratio": 0.39, "balloon_bytes": 100 * MiB, "balloon_target_bytes": 162 * MiB,
            "balloon_max_bytes": 332 * MiB, "swap_current_bytes": None, "swap_target_bytes": 0, "shares": 5120,
            "inflated_pages": 30000, "deflated_pages": 4400, "refused_pages": 16, "lock_batches": 60,
            "unlock_batches": 9, "resets": 0, "workload": {"touches_per_s": 3.2e6, "latency_p99_us": 0.6}}
    return {**base, **overrides}


SNAPSHOT = {
    "host": {"host_memory_bytes": 1024 * MiB, "free_bytes": -20 * MiB, "granted_bytes": 1044 * MiB,
             "idle_tax_ratio": 0.75, "vms_alive": 2, "state": "low",
             "thresholds_bytes": {"high": 61 * MiB, "soft": 41 * MiB, "hard": 20 * MiB, "low": 10 * MiB},
             "protocol_errors": {"MALFORMED": 3},
             "counters": {"agents_lost": 1, "resets": 2, "blocks": 1, "vswap_limit_changes": 4}},
    "vms": [vm("web"), vm("batch", alive=False, swap_current_bytes=148 * MiB, workload={}),
            vm("plain", has_agent=False, frozen=True, vswap_limit_bytes=300 * MiB, balloon_bytes=0, workload={})],
}


def samples() -> dict[tuple[str, tuple], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: SNAPSHOT))
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_host_gauges_and_the_state_as_one_hot_labels():
    values = samples()
    assert values[("balloonlab_host_memory_bytes", ())] == 1024 * MiB
    assert values[("balloonlab_host_free_bytes", ())] == -20 * MiB
    assert values[("balloonlab_host_state", (("state", "low"),))] == 1.0
    assert values[("balloonlab_host_state", (("state", "high"),))] == 0.0
    assert values[("balloonlab_host_free_threshold_bytes", (("state", "high"),))] == 61 * MiB


def test_per_vm_gauges_counters_and_unknowns_left_out():
    values = samples()
    assert values[("balloonlab_vm_balloon_bytes", (("vm", "web"),))] == 100 * MiB
    assert values[("balloonlab_vm_alive", (("vm", "batch"),))] == 0.0
    assert values[("balloonlab_vm_inflated_pages_total", (("vm", "web"),))] == 30000
    assert values[("balloonlab_vm_swap_bytes", (("vm", "batch"),))] == 148 * MiB
    assert ("balloonlab_vm_swap_bytes", (("vm", "web"),)) not in values  # unknown is absent, not 0
    assert values[("balloonlab_vm_workload_touch_latency_p99_seconds", (("vm", "web"),))] == 0.6e-6
    assert values[("balloonlab_protocol_errors_total", (("code", "MALFORMED"),))] == 3
    assert values[("balloonlab_agents_lost_total", ())] == 1


def test_names_follow_prometheus_conventions():
    for family in metric_families(SNAPSHOT):
        assert family.name.startswith("balloonlab_")
        if family.type == "counter":
            assert not family.name.endswith("_total")  # the client appends it to the samples
        for unit in ("_mib", "_ms", "_kb", "_percent"):
            assert unit not in family.name


def test_no_snapshot_yet_means_no_metrics():
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: None))
    assert generate_latest(registry) == b""


def test_host_swap_and_blocking_per_vm():
    values = samples()
    assert values[("balloonlab_vm_host_limit_bytes", (("vm", "plain"),))] == 300 * MiB
    assert ("balloonlab_vm_host_limit_bytes", (("vm", "web"),)) not in values  # its own limit: absent
    assert values[("balloonlab_vm_has_agent", (("vm", "plain"),))] == 0.0
    assert values[("balloonlab_vm_blocked", (("vm", "plain"),))] == 1.0
    assert values[("balloonlab_vm_blocked", (("vm", "web"),))] == 0.0
    assert values[("balloonlab_blocks_total", ())] == 1
    assert values[("balloonlab_host_limit_changes_total", ())] == 4
