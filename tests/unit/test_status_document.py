"""The status document's field names are a contract (the dashboard, scripts, the README): pinned
by a golden file, and what HostCore builds has exactly the fields its TypedDicts declare."""

from __future__ import annotations

import json
from pathlib import Path

from hostd.status_doc import DepartedVm, HostStatus, StatusDocument, VmStatus, field_names
from protocol import Bye, Hello
from tests.unit.test_core import STATS_KEYS, Harness, hello, status

GOLDEN = Path(__file__).parent.parent / "data" / "status_fields.json"


def test_field_names_match_the_golden_file():
    # A deliberate change: regenerate with
    #   python -c "import json; from hostd.status_doc import field_names; print(json.dumps(field_names(), indent=1))"
    # and say so in the README's status table.
    assert field_names() == json.loads(GOLDEN.read_text())


def test_hostcore_builds_exactly_the_declared_fields():
    h = Harness(vm_cgroups={"plain": "plain"})
    h.send("a", hello("a"))
    h.send("a", status(usage=100 << 20, ws=0.3, samples=1))
    h.send("b", Hello(vm_id="b", memsz_bytes=64 << 20, agent_version="t", page_kind="pfn", supports_2m=False,
                      cgroup_version=1, max_batch_pages=512, held_pages=0, last_host_session_id=None,
                      stats_keys=STATS_KEYS))
    h.send("b", Bye(reason="done"))
    h.core.observe_cgroup("plain", 50 << 20, 0, 128 << 20, 0)
    h.tick()
    document: StatusDocument = h.core.snapshot(0)
    assert list(document) == list(StatusDocument.__annotations__)
    assert set(document["host"]) == set(HostStatus.__annotations__)
    assert {vm["vm_id"] for vm in document["vms"]} == {"a", "plain"}
    for vm in document["vms"]:  # an agent's vm and an agentless one
        assert set(vm) == set(VmStatus.__annotations__), vm["vm_id"]
    assert [set(d) for d in document["departed"]] == [set(DepartedVm.__annotations__)] or document["departed"] == []
