"""The agent's side of protocol v3 identity, and what it takes from a host, for real (real
agent process in a memory cgroup, MiniHost on loopback): no self-chosen routing id, the
welcome's vm_secret presented on every re-hello and never logged, replies that never come
expired (re-hello, re-adopt) instead of stalling, welcome periods floored, absurd target
seq jumps ignored."""

from __future__ import annotations

import time

import pytest
import zmq

from protocol import ErrorCode, Hello, decode, encode
from tests.integration.conftest import MiB, start_agent
from tests.integration.minihost import MiniHost

pytestmark = [pytest.mark.integration, pytest.mark.root]
PAGES_PER_MiB = MiB // 4096


def _balloon_at(host: MiniHost, vm_id: str, pages: int):
    return lambda: ((s := host.last_status()) is not None and s.balloon_pages == pages
                    and len(host.ledger.get(vm_id.encode(), ())) == pages)


def _claim(context: zmq.Context, host: MiniHost, vm_id: str, **fields) -> int:
    """An intruder's hello for `vm_id`; the error code (or 0 for a welcome) it gets back."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(host.endpoint)
    try:
        hello = dict(vm_id=vm_id, memsz_bytes=1 << 30, agent_version="intruder", page_kind="vpn", supports_2m=False,
                     cgroup_version=2, max_batch_pages=512, held_pages=0, last_host_session_id=None, stats_keys=())
        hello.update(fields)
        sock.send(encode(Hello(**hello), 1))
        replies: list[bytes] = []
        host.pump(lambda: sock.poll(0) and replies.append(sock.recv()) is None, 5, "the intruder's answer")
        message = decode(replies[0]).message
        return getattr(message, "code", 0)
    finally:
        sock.close(linger=0)


def test_rehello_presents_the_latest_secret_and_never_logs_it(make_cgroup, minihost, context):
    cgroup = make_cgroup(256 * MiB, 0)
    agent = start_agent(cgroup, minihost, "ident")
    minihost.pump(lambda: minihost.welcomes, 10, "welcome")
    first = minihost.hellos[0]
    assert first.vm_secret is None and first.last_host_session_id is None
    route = minihost.vm_routes["ident"]
    assert route != b"ident" and route[:1] == b"\0", "the ROUTER assigns routing ids; the agent sets none"
    minihost.set_target("ident", 16 * PAGES_PER_MiB)
    minihost.pump(_balloon_at(minihost, "ident", 16 * PAGES_PER_MiB), 20, "balloon at 16 MiB")

    # hostd marked it lost: NOT_REGISTERED, then a hello with the secret of the latest welcome.
    minihost.forget("ident")
    minihost.pump(lambda: len(minihost.welcomes) >= 2, 10, "re-registration after NOT_REGISTERED")
    again = minihost.hellos[-1]
    assert again.vm_secret == minihost.welcomes[0].vm_secret
    assert again.last_host_session_id == minihost.session_id
    assert again.held_pages == 16 * PAGES_PER_MiB
    minihost.pump(_balloon_at(minihost, "ident", 16 * PAGES_PER_MiB), 10, "re-adopted")
    second_secret = minihost.welcomes[-1].vm_secret
    assert second_secret != minihost.welcomes[0].vm_secret  # a new registration, a new secret

    # Every connection drops while the vm stays bound to the old one: only the secret gets it back.
    ledger_before = set(minihost.ledger[b"ident"])
    minihost.reopen()
    minihost.pump(lambda: len(minihost.welcomes) >= 3, 15, "re-registration after a reconnect")
    assert minihost.hellos[-1].vm_secret == second_secret
    assert minihost.vm_routes["ident"] != route
    assert minihost.conflicts == 0
    minihost.pump(lambda: len(minihost.statuses) >= 3, 5, "reports on the new connection")
    assert minihost.ledger[b"ident"] == ledger_before  # kept, not inflated again

    # Anyone else claiming the live vm is refused, with or without the (public) session id.
    assert _claim(context, minihost, "ident") == ErrorCode.CONFLICT
    assert _claim(context, minihost, "ident", last_host_session_id=minihost.session_id,
                  vm_secret="x" * 32) == ErrorCode.CONFLICT
    minihost.pump(lambda: len(minihost.statuses) >= 6, 5, "the agent still reporting")
    assert minihost.ledger[b"ident"] == ledger_before and agent.poll() is None

    log_text = cgroup.logs[-1].read_text()
    for welcome in minihost.welcomes:
        assert welcome.vm_secret not in log_text


def test_unanswered_locks_and_unlocks_expire_instead_of_stalling(make_cgroup, minihost):
    """MiniHost drops one lock reply (hostd drops replies it cannot send at once): after two
    host timeouts (2 × 1 s here) the agent says hello again with its secret, re-adopts what it
    holds and goes on to the target. An unlock reply lost while deflating expires the same way."""
    cgroup = make_cgroup(512 * MiB, 0)
    agent = start_agent(cgroup, minihost, "dropped")
    minihost.pump(lambda: minihost.welcomes, 10, "welcome")
    secret = minihost.welcomes[0].vm_secret

    minihost.drop_replies = 1
    started = time.monotonic()
    minihost.set_target("dropped", 64 * PAGES_PER_MiB)
    minihost.pump(_balloon_at(minihost, "dropped", 64 * PAGES_PER_MiB), 20, "balloon at 64 MiB despite a lost reply")
    elapsed = time.monotonic() - started
    assert minihost.dropped_replies == 1
    assert len(minihost.welcomes) == 2, "one re-registration after the lost reply"
    assert minihost.hellos[-1].vm_secret == secret and minihost.conflicts == 0
    assert elapsed >= 2.0  # it waited two host timeouts before giving up on the reply
    minihost.pump(lambda: minihost.stat("expired_requests") == 1, 5, "the expiry counted")

    # Deflating frees first and reports after: a lost unlock reply never holds the memory
    # back, and the unanswered unlock still expires into one re-registration.
    minihost.drop_replies = 1
    minihost.set_target("dropped", 0)
    minihost.pump(_balloon_at(minihost, "dropped", 0), 20, "deflated despite a lost unlock reply")
    assert minihost.dropped_replies == 2
    minihost.pump(lambda: len(minihost.welcomes) == 3, 10, "re-registration after the lost unlock reply")
    minihost.pump(lambda: minihost.stat("expired_requests") == 2, 5, "the second expiry counted")
    assert minihost.ledger[b"dropped"] == set() and minihost.last_status().balloon_pages == 0
    assert agent.poll() is None
    assert "unanswered" in cgroup.logs[-1].read_text()


def test_tiny_welcome_periods_are_floored_and_absurd_target_seqs_ignored(make_cgroup, context):
    host = MiniHost(context, report_interval_ms=10, host_timeout_ms=10, sample_period_ms=100)
    try:
        cgroup = make_cgroup(256 * MiB, 0)
        start_agent(cgroup, host, "floored")
        host.pump(lambda: host.welcomes, 10, "welcome")
        host.set_target("floored", 16 * PAGES_PER_MiB)
        host.pump(_balloon_at(host, "floored", 16 * PAGES_PER_MiB), 20, "balloon at 16 MiB")

        host.set_target("floored", 0, target_seq=2**62)  # not this host's: would mute every later target
        host.set_target("floored", 32 * PAGES_PER_MiB)
        host.pump(_balloon_at(host, "floored", 32 * PAGES_PER_MiB), 20, "the real target followed")
        host.pump(lambda: host.stat("absurd_target_seqs") == 1, 5, "the spoofed seq counted")

        # 10 ms asked, 200 ms floor: about 10 statuses in 2 s, not 200 (bound loose for a busy CI).
        before = len(host.statuses)
        until = time.monotonic() + 2.0
        host.pump(lambda: time.monotonic() > until, 5, "two seconds of reports")
        assert 3 <= len(host.statuses) - before <= 20
        assert len(host.welcomes) == 1, "a 10 ms host timeout would have dropped the host"
        assert "below the agent's floors" in cgroup.logs[-1].read_text()
    finally:
        host.close()
