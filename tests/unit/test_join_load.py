"""A flood of one-shot identities (review S11) costs bounded work: joins and departures recompute
at most every MEMBERSHIP_RECOMPUTE_MS once the table is large (hostd.core.recompute_due), the
live count is kept (not counted per tick or status), and hostd's own status document is sent
without being validated twice (the receiver's decode validates it). Simulated clock only."""

from __future__ import annotations

import dataclasses
import math

import pytest

from hostd.config import HostConfig
from hostd.core import (
    COALESCE_FROM_VMS,
    MEMBERSHIP_RECOMPUTE_MS,
    HostCore,
    recompute_due,
    silent_limit_ms,
    trusted_status_reply,
)
from protocol import GetStatus, Hello, SetTarget, Status, StatusReply, Welcome, decode, encode
from protocol.limits import MAX_CONTROL_FRAME_BYTES
from protocol.messages import check_plain_data

MiB = 1 << 20
BIG, SMALL = COALESCE_FROM_VMS, COALESCE_FROM_VMS - 1
LONG_AGO, JUST_NOW = 10_000 - MEMBERSHIP_RECOMPUTE_MS, 10_000 - MEMBERSHIP_RECOMPUTE_MS + 1


@pytest.mark.parametrize(("pending", "urgent", "alive", "last_ms", "due"), [
    (False, False, SMALL, LONG_AGO, False),  # nothing asked for
    (False, True, BIG, JUST_NOW, False),  # (urgent without a trigger cannot happen; still nothing to do)
    (True, True, BIG, JUST_NOW, True),  # a state change or a setting: at once, however large the table
    (True, False, SMALL, JUST_NOW, True),  # a small table: every join has its target at the next tick
    (True, False, BIG, JUST_NOW, False),  # a large table and a recent recompute: joins wait
    (True, False, BIG, LONG_AGO, True),  # ... until MEMBERSHIP_RECOMPUTE_MS have passed
    (True, False, BIG, -math.inf, True),  # never recomputed yet
    (True, True, SMALL, LONG_AGO, True),
])
def test_recompute_due(pending, urgent, alive, last_ms, due):
    assert recompute_due(pending, urgent, alive, 10_000, last_ms) is due


def hello(vm_id: str) -> Hello:
    return Hello(vm_id=vm_id, memsz_bytes=64 * MiB, agent_version="t", page_kind="vpn", supports_2m=False,
                 cgroup_version=2, max_batch_pages=512, held_pages=0, last_host_session_id=None,
                 stats_keys=("usage_bytes",))


def core_with(vms: int, **config) -> HostCore:
    config.setdefault("host_memory_bytes", 64 << 30)
    config.setdefault("max_joins_per_s", 100_000)
    core = HostCore(HostConfig(**config), "sess", now_ms=0)
    for index in range(vms):
        core.handle_agent(f"c{index}".encode(), encode(hello(f"v{index}"), 1), 0)
    return core


def welcome_secret(out) -> str:
    [secret] = [m.vm_secret for m in (decode(frame).message for _, frame in out) if isinstance(m, Welcome)]
    return secret


def targets(out) -> set[str]:
    return {route.decode() for route, frame in out if isinstance(decode(frame).message, SetTarget)}


def test_joins_into_a_large_table_are_recomputed_together():
    core = core_with(COALESCE_FROM_VMS)
    assert len(targets(core.tick(0))) == COALESCE_FROM_VMS  # the first recompute: at once
    core.handle_agent(b"late", encode(hello("late"), 1), 100)
    assert targets(core.tick(100)) == set()  # one recompute for the joins of the next 500 ms
    assert targets(core.tick(MEMBERSHIP_RECOMPUTE_MS - 1)) == set()
    assert "late" in targets(core.tick(MEMBERSHIP_RECOMPUTE_MS))


def test_joins_into_a_small_table_are_recomputed_at_the_next_tick():
    core = core_with(2)
    assert targets(core.tick(0)) == {"c0", "c1"}
    core.handle_agent(b"late", encode(hello("late"), 1), 0)
    assert targets(core.tick(0)) == {"late"}


def test_an_urgent_trigger_is_not_held_back():
    core = core_with(COALESCE_FROM_VMS)
    core.tick(0)
    core.handle_agent(b"late", encode(hello("late"), 1), 100)
    core._ctx.request_recompute("state high → soft")  # what update_state asks for
    assert "late" in targets(core.tick(100))


def test_the_live_count_is_kept():
    core = core_with(5, report_interval_ms=1000)
    registry = core.registry
    assert registry.alive_count == 5
    core.handle_agent(b"c0", encode(hello("v0"), 2), 10)  # the same connection again: a re-registration
    assert registry.alive_count == 5
    core.tick(3_500)  # never reported: lost and forgotten
    assert registry.alive_count == 0 == sum(vm.alive for vm in registry.vms.values())
    core.handle_agent(b"n", encode(hello("n"), 1), 3_600)
    assert registry.alive_count == 1 == sum(vm.alive for vm in registry.vms.values())


def test_the_status_document_is_sent_as_validated_plain_data():
    core = core_with(3)
    core.tick(0)
    document = core.snapshot(5)
    check_plain_data(document)  # what the receiver's decode checks
    frame = encode(trusted_status_reply(document), 1, MAX_CONTROL_FRAME_BYTES)
    assert frame == encode(StatusReply(snapshot=dict(document)), 1, MAX_CONTROL_FRAME_BYTES)
    reply, _ = core.handle_control(encode(GetStatus(), 7), 5)
    message = decode(reply, MAX_CONTROL_FRAME_BYTES).message
    assert isinstance(message, StatusReply) and message.snapshot["host"]["vms_alive"] == 3


@pytest.mark.parametrize(("reported", "behind_ms", "limit_ms"), [
    (False, 0, 3000),
    (False, 2000, 3000),  # a vm that never reported gets no grace (one-shot identities)
    (True, 0, 3000),  # hostd keeps up: lost_after_reports reports
    (True, 1200, 4200),  # its frames may be queued behind a flood: the time hostd is behind
    (True, 9000, 6000),  # ... at most another lost_after_reports reports
    (True, -5, 3000),
])
def test_silent_limit(reported, behind_ms, limit_ms):
    assert silent_limit_ms(3000, reported, behind_ms) == limit_ms


def test_the_tick_finds_every_lost_agent_at_the_tick_a_full_scan_would():
    """The tick skips its scan until an agent can be due (HostCore._scan_for_lost): vms that
    join between scans, report or fall silent at staggered times are each lost at the first
    tick past their own limit, no later, against a reference that checks every vm each tick."""
    core = core_with(0, report_interval_ms=1000)  # lost after 3 s of silence (no report: no grace)
    status = Status(balloon_pages=0, acked_target_seq=0, refused_pages=0, agent_state="idle", usage_bytes=1 << 20,
                    ws_touched_ratio=None, ws_samples=0, ws_current_ratio=None, ws_method="referenced",
                    stats=(None,))
    joins = {f"v{i}": 137 * i for i in range(12)}  # a join every 137 ms
    last_report = {f"v{i}": 137 * i + 911 * (i % 3) for i in range(12)}  # some report once, later
    reported: set[str] = set()
    for now in range(0, 9_000, 100):
        for vm_id, at in joins.items():
            if now - 100 < at <= now:
                core.handle_agent(vm_id.encode(), encode(hello(vm_id), 1), at)
        for vm_id, at in last_report.items():
            if at != joins[vm_id] and now - 100 < at <= now and core.vms[vm_id].alive:
                core.handle_agent(vm_id.encode(), encode(status, 2), at)
                reported.add(vm_id)
        alive_before = {v for v, vm in core.vms.items() if vm.alive}
        core.tick(now)
        due = {v for v in alive_before if now - (last_report[v] if v in reported else joins[v]) > 3_000}
        assert {v for v in alive_before if not (v in core.vms and core.vms[v].alive)} == due, now


def test_an_agent_that_reported_is_not_lost_while_hostd_is_behind_reading():
    core = core_with(2, report_interval_ms=1000)  # lost after 3 s of silence
    status = Status(balloon_pages=0, acked_target_seq=0, refused_pages=0, agent_state="idle", usage_bytes=1 << 20,
                    ws_touched_ratio=None, ws_samples=0, ws_current_ratio=None, ws_method="referenced",
                    stats=(None,))
    core.handle_agent(b"c0", encode(status, 2), 0)  # v0 reported, v1 never did
    core.tick(3_500, reading_behind_ms=1_000)
    assert core.vms["v0"].alive and "v1" not in core.vms
    core.tick(4_001, reading_behind_ms=1_000)
    assert not core.vms["v0"].alive
    # Naming this host session proves nothing (the id is public): no grace for the claim alone...
    claim = Hello(vm_id="v9", memsz_bytes=64 * MiB, agent_version="t", page_kind="vpn", supports_2m=False,
                  cgroup_version=2, max_batch_pages=512, held_pages=0, last_host_session_id="sess",
                  stats_keys=("usage_bytes",))
    core.handle_agent(b"c9", encode(claim, 1), 5_000)
    core.tick(8_500, reading_behind_ms=1_000)
    assert "v9" not in core.vms or not core.vms["v9"].alive
    # ...but an agent that re-registers with its secret, not reported yet on the new connection, has it.
    secret = welcome_secret(core.handle_agent(b"c8", encode(hello("v8"), 1), 9_000))
    proven = dataclasses.replace(hello("v8"), last_host_session_id="sess", vm_secret=secret)
    core.handle_agent(b"c8b", encode(proven, 1), 9_000)
    assert core.vms["v8"].agent is not None and core.vms["v8"].agent.proven
    core.tick(12_500, reading_behind_ms=1_000)
    assert core.vms["v8"].alive


def test_a_vm_whose_connection_closed_before_it_reported_is_forgotten_at_once():
    core = core_with(3, report_interval_ms=1000)
    status = Status(balloon_pages=0, acked_target_seq=0, refused_pages=0, agent_state="idle", usage_bytes=1 << 20,
                    ws_touched_ratio=None, ws_samples=0, ws_current_ratio=None, ws_method="referenced",
                    stats=(None,))
    core.handle_agent(b"c1", encode(status, 2), 10)  # v1 reported
    core.route_gone(b"c0", 20)  # its welcome could not be sent
    core.route_gone(b"c1", 20)
    core.route_gone(b"nobody", 20)
    assert "v0" not in core.vms and core.vms["v1"].alive and core.vms["v2"].alive
    assert core.registry.alive_count == 2 and core.counters["vms_forgotten"] == 1
    claim = Hello(vm_id="v3", memsz_bytes=64 * MiB, agent_version="t", page_kind="vpn", supports_2m=False,
                  cgroup_version=2, max_batch_pages=512, held_pages=0, last_host_session_id="sess",
                  stats_keys=("usage_bytes",))
    core.handle_agent(b"c3", encode(claim, 1), 30)
    core.route_gone(b"c3", 40)  # naming the session is no proof (the id is public): dropped like any one-shot
    assert "v3" not in core.vms
    secret = welcome_secret(core.handle_agent(b"c4", encode(hello("v4"), 1), 50))
    core.handle_agent(b"c4b", encode(dataclasses.replace(hello("v4"), last_host_session_id="sess",
                                                         vm_secret=secret), 1), 60)
    core.route_gone(b"c4b", 70)  # re-registered with its secret: an agent hostd knew, kept
    assert core.vms["v4"].alive
