"""The registry is the one writer of usage, Σgranted and the free-memory state."""

import ast
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from hostd import policy
from hostd.config import VmParams
from hostd.registry import AgentLink, Identity, Registry, VmRecord
from protocol import Hello
from tests.conftest import hypothesis_examples

ROOT = Path(__file__).resolve().parents[2]
MIB_PAGES = 256  # pages per MiB
HOST_PAGES = 1024 * MIB_PAGES
VM_IDS = ("a", "b", "c")


def hello(vm_id: str) -> Hello:
    return Hello(vm_id=vm_id, memsz_bytes=512 << 20, agent_version="t", page_kind="vpn", supports_2m=False,
                 cgroup_version=2, max_batch_pages=512, held_pages=0, last_host_session_id=None, stats_keys=())


def record(vm_id: str, agent: bool, now_ms: int) -> VmRecord:
    link = AgentLink(hello=hello(vm_id), route=f"r-{vm_id}".encode()) if agent else None
    return VmRecord(vm_id=vm_id, identity=Identity(claimed_memsz_bytes=512 << 20), params=VmParams(),
                    last_seen_ms=now_ms, agent=link)


operation = st.one_of(
    st.tuples(st.just("put"), st.sampled_from(VM_IDS), st.booleans()),
    st.tuples(st.just("usage"), st.sampled_from(VM_IDS), st.integers(0, 600 * MIB_PAGES),
              st.integers(0, 600 * MIB_PAGES)),
    st.tuples(st.just("consumed"), st.sampled_from(VM_IDS), st.integers(0, 600 * MIB_PAGES)),
    st.tuples(st.just("leave"), st.sampled_from(VM_IDS)),
    st.tuples(st.just("detach"), st.sampled_from(VM_IDS), st.integers(0, 600 * MIB_PAGES)),
    st.tuples(st.just("forget"), st.sampled_from(VM_IDS)),
)


@settings(max_examples=hypothesis_examples(200))
@given(st.lists(operation, max_size=40))
def test_granted_is_the_sum_over_the_records_after_any_sequence(operations):
    registry = Registry({})
    for now_ms, (kind, vm_id, *args) in enumerate(operations):
        vm = registry.vms.get(vm_id)
        if kind == "put":
            new = record(vm_id, args[0], now_ms)
            registry.put(new)
            if new.agent is not None:
                registry.bind_route(new, new.agent.route)
        elif vm is None:
            continue
        elif kind == "usage":
            registry.set_usage(vm, consumed_pages=args[0], balloon_pages=args[1])
        elif kind == "consumed":
            registry.set_usage(vm, consumed_pages=args[0])
        elif kind == "leave" and vm.alive:
            registry.leave(vm, now_ms, "test")
        elif kind == "detach" and vm.has_agent:
            vm.host.cgroup_usage_pages = args[0]
            registry.detach_agent(vm)
        elif kind == "forget":
            registry.forget(vm)
        assert registry.granted_pages == sum(v.granted_pages for v in registry.vms.values())
        assert all(v.granted_pages == 0 for v in registry.vms.values() if not v.alive)
        assert all(registry.by_route(v.agent.route) is v for v in registry.vms.values()
                   if v.alive and v.agent is not None)
        registry.next_state(HOST_PAGES, policy.thresholds(HOST_PAGES, False))
        assert registry.state == policy.next_state(registry.state, registry.free_pages(HOST_PAGES),
                                                   policy.thresholds(HOST_PAGES, False))


def test_the_policy_outcome_has_one_home():
    registry = Registry({})
    vm = record("a", True, 0)
    registry.put(vm)
    assert registry.outcome(vm).alloc_target_pages == 0 and registry.reason(vm) == "joined"
    inputs = [policy.VmInput(vm_id="a", memsz_pages=vm.memsz_pages, shares=vm.shares(), reservation_pages=0,
                             limit_pages=vm.limit_pages, maxmemctl_pages=None, active_ratio=0.5, balloon_pages=0,
                             agent_alive=True, agent_refusing=False, manual_balloon_pages=None,
                             balloon_target_pages=0)]
    result = policy.compute_targets(policy.HostInput(HOST_PAGES, 0.75, 65, False), inputs, "high")
    registry.adopt_result(result, [vm])
    assert registry.outcome(vm).alloc_target_pages == int(result.alloc_target_pages[0])
    assert registry.reason(vm) == result.decision(0).reason
    registry.forget(vm)
    assert registry.outcome(vm).alloc_target_pages == 0


def test_only_the_registry_writes_usage():
    """`_alive`, `_consumed_pages` and `_balloon_pages` are assigned in hostd/registry.py only."""
    writers = []
    for path in sorted((ROOT / "hostd").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, ast.AugAssign | ast.AnnAssign) else []
            for target in targets:
                for leaf in ast.walk(target):
                    if isinstance(leaf, ast.Attribute) and leaf.attr in ("_alive", "_consumed_pages",
                                                                          "_balloon_pages", "_granted"):
                        writers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert writers and all(w.startswith("hostd/registry.py:") for w in writers), writers
