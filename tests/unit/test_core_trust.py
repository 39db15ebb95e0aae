"""What a peer sends is a hint: identities, authority, bounds and bounded state in HostCore.

Pure: frames and a fake clock in, frames out (the same Harness as test_core)."""

from __future__ import annotations

import json
import math

import msgpack
import pytest

from hostd.config import HostConfig
from hostd.core import HostCore
from protocol import (
    ControlOk,
    Error,
    ErrorCode,
    GetStatus,
    Hello,
    Lock,
    LockResult,
    PageRanges,
    RangeStatus,
    SetHostParams,
    SetManualTarget,
    SetVmParams,
    StatusReply,
    Welcome,
    decode,
    encode,
)
from protocol.limits import PROTOCOL_VERSION
from tests.unit.test_core import CONTROL_TOKEN, STATS_KEYS, Harness, MiB, hello, status

VICTIM, INTRUDER = b"\x00victim", b"\x00intruder"


def send(h: Harness, route: bytes, message, user_id=None):
    h.seq += 1
    out = h.core.handle_agent(route, encode(message, h.seq), h.now, user_id)
    return [(identity, decode(frame).message) for identity, frame in out]


def register(h: Harness, route: bytes, vm_id: str = "db", held: int = 0, user_id=None) -> Welcome:
    [(_, welcome)] = send(h, route, hello(vm_id, held=held), user_id)
    assert isinstance(welcome, Welcome), welcome
    return welcome


def rehello(vm_id: str, secret: str | None, session: str | None = "sess", held: int = 0) -> Hello:
    return Hello(vm_id=vm_id, memsz_bytes=256 * MiB, agent_version="t", page_kind="vpn", supports_2m=False,
                 cgroup_version=2, max_batch_pages=512, held_pages=held, last_host_session_id=session,
                 stats_keys=STATS_KEYS, vm_secret=secret)


# ---- identities ----------------------------------------------------------------------------------
def test_a_live_vm_cannot_be_claimed_without_its_secret():
    h = Harness()
    welcome = register(h, VICTIM)
    send(h, VICTIM, Lock(pages=PageRanges(((0, 512),)), adopt=False))
    assert h.core.ledger.held_pages("db") == 512
    attempts = [rehello("db", None, None), rehello("db", None, "sess"),  # the public session id is no key
                rehello("db", "x" * 32, "sess"), rehello("db", welcome.vm_secret, "other-session")]
    for attempt in attempts:
        [(_, reply)] = send(h, INTRUDER, attempt)
        assert isinstance(reply, Error) and reply.code == ErrorCode.CONFLICT, attempt
    # The intruder's connection speaks for nobody; the live agent keeps everything.
    [(_, reply)] = send(h, INTRUDER, Lock(pages=PageRanges(((512, 1),)), adopt=False))
    assert isinstance(reply, Error) and reply.code == ErrorCode.NOT_REGISTERED
    assert h.core.ledger.held_pages("db") == 512 and h.core.vms["db"].agent.route == VICTIM
    assert h.core.counters["identity_conflicts"] == len(attempts)
    [(route, reply)] = send(h, VICTIM, Lock(pages=PageRanges(((512, 1),)), adopt=False))
    assert route == VICTIM and isinstance(reply, LockResult)


def test_the_same_agent_reconnects_with_its_secret_and_keeps_its_ledger():
    h = Harness()
    welcome = register(h, VICTIM)
    send(h, VICTIM, Lock(pages=PageRanges(((0, 300),)), adopt=False))
    new_route = b"\x00reconnected"
    [(route, again)] = send(h, new_route, rehello("db", welcome.vm_secret, held=300))
    assert route == new_route and isinstance(again, Welcome) and again.vm_secret == welcome.vm_secret
    assert h.core.ledger.held_pages("db") == 300
    [(_, reply)] = send(h, VICTIM, status())  # the old connection no longer speaks for db
    assert isinstance(reply, Error) and reply.code == ErrorCode.NOT_REGISTERED


def test_the_secret_is_in_no_status_output():
    h = Harness()
    welcome = register(h, VICTIM)
    reply, _ = h.control(GetStatus())
    assert isinstance(reply, StatusReply)
    assert welcome.vm_secret not in json.dumps(reply.snapshot)


def test_one_connection_speaks_for_one_vm():
    h = Harness()
    register(h, VICTIM, "db")
    [(_, reply)] = send(h, VICTIM, hello("web"))
    assert isinstance(reply, Error) and reply.code == ErrorCode.CONFLICT
    assert "web" not in h.core.vms


def test_curve_keys_register_only_their_vms_and_revocation_is_immediate():
    h = Harness()
    h.core.agent_vm_ids = {"agentA": frozenset({"web"}), "agentB": frozenset({"db"})}
    [(_, reply)] = send(h, INTRUDER, hello("db"), "agentA")
    assert isinstance(reply, Error) and reply.code == ErrorCode.UNAUTHORIZED
    register(h, VICTIM, "db", user_id="agentB")
    register(h, b"\x00web", "web", user_id="agentA")
    # A frame on db's connection with another User-Id is refused (checked per frame).
    [(_, reply)] = send(h, VICTIM, status(), "agentA")
    assert isinstance(reply, Error) and reply.code == ErrorCode.UNAUTHORIZED
    assert send(h, VICTIM, status(), "agentB") == []
    h.core.set_agent_keys({"agentA": frozenset({"web"})}, h.now)  # agentB removed
    assert not h.core.vms["db"].alive and h.core.vms["web"].alive
    [(_, reply)] = send(h, VICTIM, status(), "agentB")
    assert isinstance(reply, Error) and reply.code in (ErrorCode.NOT_REGISTERED, ErrorCode.UNAUTHORIZED)
    [(_, reply)] = send(h, VICTIM, hello("db"), "agentB")
    assert isinstance(reply, Error) and reply.code == ErrorCode.UNAUTHORIZED


# ---- control authority ---------------------------------------------------------------------------
@pytest.mark.parametrize("token", [None, "wrong-token-0123456789", CONTROL_TOKEN[:-1] + "x"])
def test_changes_without_the_token_change_nothing(token):
    h = Harness()
    register(h, VICTIM, "db")
    before = h.core.snapshot(0)
    for request in (SetHostParams(params={"host_memory_bytes": 64 * MiB}, control_token=token),
                    SetVmParams(vm_id="db", params={"shares": 0}, control_token=token),
                    SetManualTarget(vm_id="db", balloon_target_pages=1000, control_token=token)):
        reply, out = h.control(request, operator=False)
        assert isinstance(reply, Error) and reply.code == ErrorCode.UNAUTHORIZED and out == []
    after = h.core.snapshot(0)
    for snapshot in (before, after):
        snapshot["host"].pop("counters"), snapshot["host"].pop("protocol_errors")
    assert after == before and h.core.counters["control_refused"] == 3
    assert isinstance(h.control(GetStatus(), operator=False)[0], StatusReply)  # reading stays open


def test_the_token_or_an_operator_connection_may_change():
    h = Harness()
    reply, _ = h.control(SetHostParams(params={"idle_tax_ratio": 0.5}, control_token=CONTROL_TOKEN), operator=False)
    assert isinstance(reply, ControlOk)
    assert isinstance(h.control(SetHostParams(params={"idle_tax_ratio": 0.4}), operator=True)[0], ControlOk)
    tokenless = HostCore(HostConfig(host_memory_bytes=400 * MiB), "s", 0, control_token=None)
    reply, _ = tokenless.handle_control(encode(SetHostParams(params={"idle_tax_ratio": 0.5},
                                                             control_token=CONTROL_TOKEN), 1), 0)
    assert decode(reply).message.code == ErrorCode.UNAUTHORIZED


def test_settings_survive_a_restart():
    h = Harness()
    register(h, VICTIM, "db")
    h.control(SetHostParams(params={"idle_tax_ratio": 0.3, "host_memory_bytes": 300 * MiB}))
    h.control(SetVmParams(vm_id="db", params={"shares": "high"}))
    h.control(SetManualTarget(vm_id="db", balloon_target_pages=1000))
    document = json.loads(json.dumps(h.core.settings_document()))  # as the server writes it
    restarted = HostCore(HostConfig(host_memory_bytes=400 * MiB), "sess2", 0)
    assert restarted.restore_settings(document, 0) == []
    assert restarted.settings.idle_tax_ratio == 0.3 and restarted.settings.host_memory_pages == 300 * 256
    restarted.handle_agent(VICTIM, encode(hello("db"), 1), 0)
    assert restarted.vms["db"].params.shares == "high" and restarted.vms["db"].targets.manual_balloon_pages == 1000
    bad = restarted.restore_settings({"host": {"idle_tax_ratio": 7}, "vms": {"../x": {}, "ok": {"params": 3}}}, 0)
    assert len(bad) == 3 and restarted.settings.idle_tax_ratio == 0.3


# ---- numbers a peer sends ------------------------------------------------------------------------
EXTREMES = [2**63, 2**64 - 1, 2**63 - 1, 2**53 + 1, -1, -(2**63), float("nan"), float("inf"), -float("inf"), 1e300]


def raw_status(stats: list, **typed: object) -> bytes:
    body = {"balloon_pages": 0, "acked_target_seq": 0, "refused_pages": 0, "agent_state": "idle",
            "usage_bytes": 100 * MiB, "ws_touched_ratio": None, "ws_samples": 0, "ws_current_ratio": None,
            "ws_method": "none", "stats": stats, **typed}
    return msgpack.packb({"v": PROTOCOL_VERSION, "kind": "status", "seq": 9, "body": body}, use_bin_type=True)


def strict_json(document) -> str:
    return json.dumps(document, allow_nan=False)


@pytest.mark.parametrize("value", EXTREMES)
def test_absurd_stats_never_break_status_or_the_host(value):
    h = Harness()
    register(h, VICTIM, "db")
    out = h.core.handle_agent(VICTIM, raw_status([value, value, value]), 0)
    # Informational stats: absurd numbers are unknown; NaN and infinities are refused by the codec.
    assert [decode(frame).message.code for _, frame in out] == ([] if isinstance(value, int) or math.isfinite(value)
                                                                 else [ErrorCode.INVALID_FIELD])
    h.tick()
    reply, _ = h.control(GetStatus())
    assert isinstance(reply, StatusReply)
    snapshot = reply.snapshot
    strict_json(snapshot)
    db = snapshot["vms"][0]
    assert 0 <= db["consumed_bytes"] <= db["memsz_bytes"]
    assert snapshot["host"]["free_bytes"] >= 400 * MiB - 256 * MiB
    assert h.core.state == "high"


@pytest.mark.parametrize("field", ["usage_bytes", "ws_samples", "ws_current_ratio", "ws_touched_ratio"])
@pytest.mark.parametrize("value", [*EXTREMES, 2**50 + 1, 1.5, "1"])
def test_an_absurd_typed_policy_input_is_refused_and_changes_nothing(field, value):
    h = Harness()
    register(h, VICTIM, "db")
    h.core.handle_agent(VICTIM, raw_status([None, None, None], usage_bytes=50 * MiB), 0)
    vm = h.core.vms["db"]
    before = (vm.consumed_pages, vm.working_set)
    out = h.core.handle_agent(VICTIM, raw_status([None, None, None], **{field: value}), 0)
    valid = (field == "ws_samples" and isinstance(value, int) and 0 <= value < 2**63) or \
        (field == "usage_bytes" and isinstance(value, int) and 0 <= value <= 2**50)
    if valid:
        assert out == []
    else:
        assert [decode(frame).message.code for _, frame in out] == [ErrorCode.INVALID_FIELD]
        assert (vm.consumed_pages, vm.working_set) == before
    strict_json(h.core.snapshot(0))
    assert h.core.state == "high" and vm.alive


@pytest.mark.parametrize("memsz", [2**50, 2**40])
def test_a_fake_giant_moves_honest_targets_no_more_than_an_honest_vm_of_host_size(memsz):
    def run(fake_memsz: int) -> dict:
        h = Harness()
        register(h, VICTIM, "web")
        send(h, VICTIM, status(usage=200 * MiB, ws=0.5, samples=1))
        fake = Hello(vm_id="evil", memsz_bytes=fake_memsz, agent_version="t", page_kind="vpn", supports_2m=False,
                     cgroup_version=2, max_batch_pages=512, held_pages=0, last_host_session_id=None,
                     stats_keys=STATS_KEYS)
        send(h, INTRUDER, fake)
        h.core.handle_agent(INTRUDER, raw_status([fake_memsz, 1, 1.0]), 0)
        h.tick()
        web = h.core.vms["web"]
        outcome = h.core.registry.outcome(web)
        return {"state": h.core.state, "alloc": outcome.alloc_target_pages,
                "balloon": web.targets.balloon_target_pages, "swap": outcome.swap_target_pages}

    assert run(memsz) == run(400 * MiB)  # capped at host memory: the same as an honest host-sized vm


def test_host_memory_too_small_for_anything_is_refused_and_rho_stays_finite():
    h = Harness()
    register(h, VICTIM, "db")
    for tiny in (4096, 1 * MiB):
        reply, _ = h.control(SetHostParams(params={"host_memory_bytes": tiny}))
        assert isinstance(reply, Error) and reply.code == ErrorCode.INVALID_FIELD
    assert isinstance(h.control(SetHostParams(params={"host_memory_bytes": 16 * MiB}))[0], ControlOk)
    send(h, VICTIM, status(usage=200 * MiB))
    h.tick()
    reply, _ = h.control(GetStatus())
    assert isinstance(reply, StatusReply)
    strict_json(reply.snapshot)
    for event in h.core.drain_events():
        strict_json(event)
    assert all(v["rho"] is None or math.isfinite(v["rho"]) for v in reply.snapshot["vms"])


def test_batches_over_the_limit_are_refused_before_the_ledger_works():
    h = Harness(batch_limit_pages=512)
    register(h, VICTIM, "db")
    h.core.vms["db"].targets.balloon_target_pages = 10_000
    [(_, reply)] = send(h, VICTIM, Lock(pages=PageRanges(tuple((2 * i, 1) for i in range(513))), adopt=False))
    assert isinstance(reply, Error) and reply.code == ErrorCode.LIMIT_EXCEEDED
    assert h.core.ledger.held_pages("db") == 0
    [(_, reply)] = send(h, VICTIM, Lock(pages=PageRanges(((0, 512),)), adopt=False))
    assert [r.status for r in reply.results] == [RangeStatus.OK]


def test_adopted_balloons_are_capped_by_what_hostd_can_see():
    h = Harness(host_memory_bytes=400 * MiB)
    huge = Hello(vm_id="db", memsz_bytes=2**40, agent_version="t", page_kind="vpn", supports_2m=False,
                 cgroup_version=2, max_batch_pages=512, held_pages=2**28, last_host_session_id="old",
                 stats_keys=STATS_KEYS)
    send(h, VICTIM, huge)
    assert h.core.vms["db"].balloon_pages <= 400 * 256 == h.core.vms["db"].memsz_pages


def test_a_failing_handler_answers_internal_and_the_core_goes_on(monkeypatch):
    h = Harness()
    register(h, VICTIM, "db")

    def broken(*_args, **_kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(h.core.agents, "_on_status", broken)
    [(_, reply)] = send(h, VICTIM, status())
    assert isinstance(reply, Error) and reply.code == ErrorCode.INTERNAL
    assert h.core.protocol_errors["INTERNAL"] == 1
    monkeypatch.setattr(h.core, "snapshot", broken)
    reply, _ = h.control(GetStatus())
    assert isinstance(reply, Error) and reply.code == ErrorCode.INTERNAL
    monkeypatch.undo()
    assert isinstance(h.control(GetStatus())[0], StatusReply)


# ---- bounded state -------------------------------------------------------------------------------
def test_one_shot_identities_are_rate_limited_capped_and_forgotten():
    h = Harness(max_vms=1_000, max_joins_per_s=500, dead_vm_ttl_ms=5_000, report_interval_ms=100)
    welcomed = refused = 0
    for index in range(20_000):
        h.now = index  # 1,000 hellos a second, each from a connection that then goes silent
        [(_, reply)] = send(h, b"\x00one-shot-%d" % index, hello(f"vm{index}", memsz=16 * MiB))
        welcomed += isinstance(reply, Welcome)
        refused += isinstance(reply, Error) and reply.code == ErrorCode.LIMIT_EXCEEDED
        if index % 100 == 0:
            h.tick()
    assert welcomed + refused == 20_000
    assert welcomed <= 500 * 21
    assert len(h.core.vms) <= 1_000
    h.now += 10_000
    h.tick()
    h.now += 6_000
    h.tick()
    assert h.core.vms == {} and h.core.snapshot(h.now)["vms"] == []
    register(h, VICTIM, "honest")  # the table has room again


def test_a_refusal_is_remembered_until_the_balloon_reaches_its_target():
    """The agent refuses, pauses and reports idle again: what its balloon holds, not its target,
    is what ballooning covers until it gets there (else host swap is never due)."""
    h = Harness(host_memory_bytes=300 * MiB)
    register(h, VICTIM, "a")
    register(h, INTRUDER, "b")
    for route in (VICTIM, INTRUDER):
        send(h, route, status(usage=250 * MiB, ws=0.9, samples=1))
    h.tick()
    a = h.core.vms["a"]
    assert a.targets.balloon_target_pages > 0 and h.core.state in ("hard", "low")
    refusing = status(usage=250 * MiB, ws=0.9, samples=1, state="refusing")
    send(h, VICTIM, refusing)
    send(h, VICTIM, status(usage=250 * MiB, ws=0.9, samples=1, state="idle"))  # between two refusals
    h.core.recompute(h.now, "test")
    assert a.agent.refusing and h.core.registry.outcome(a).swap_target_pages > 0
