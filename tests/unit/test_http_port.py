"""The HTTP port makes hostd build snapshots only while someone wants them on a big host."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

from hostd.http import HISTORY_MAX_VMS, HttpPort, host_allowed
from tests.conftest import free_loopback_port


def _snapshot(uptime_ms: int) -> dict:
    host = {"uptime_ms": uptime_ms, "state": "high", "free_bytes": 0, "host_memory_bytes": 0,
            "thresholds_bytes": {"high": 0, "soft": 0, "hard": 0, "low": 0}}
    return {"host": host, "vms": []}


def test_small_host_always_wants_snapshots_for_the_dashboard_history():
    port = HttpPort(("127.0.0.1", free_loopback_port()))
    try:
        assert port.wants_snapshot(HISTORY_MAX_VMS)
        assert not port.wants_snapshot(HISTORY_MAX_VMS + 1)
    finally:
        port.server.server_close()


def test_a_request_on_a_big_host_waits_for_a_fresh_snapshot_and_keeps_them_coming():
    port = HttpPort(("127.0.0.1", free_loopback_port()))
    port.start()
    try:
        big = 2_000
        assert not port.wants_snapshot(big)  # nobody asked: no snapshot work
        answer: dict = {}

        def fetch() -> None:
            with urllib.request.urlopen(f"http://127.0.0.1:{port.address[1]}/status.json", timeout=10) as reply:
                answer.update(json.loads(reply.read()))

        client = threading.Thread(target=fetch)
        client.start()
        for _ in range(500):  # ≤ 5 s for the request to arrive
            if port.wants_snapshot(big):
                break
            time.sleep(0.01)
        port.publish(_snapshot(42_000))  # what the main loop does once it sees the demand
        client.join(10)
        assert answer["host"]["uptime_ms"] == 42_000  # the fresh one, not the empty stale state
        assert port.wants_snapshot(big)  # a scraper keeps them coming for the demand window
    finally:
        port.close()


LOCAL = frozenset({"localhost", "127.0.0.1", "::1"})


def test_host_header_must_name_this_port_against_dns_rebinding():
    for good in ("localhost", "LOCALHOST:8055", "127.0.0.1", "127.0.0.1:18055", "[::1]", "[::1]:8055",
                 "localhost.", " localhost:80 "):
        assert host_allowed(good, LOCAL, any_ip_literal=False), good
    for bad in ("evil.example", "evil.example:8055", "localhost.evil.example", "127.0.0.2:8055", "10.0.0.5",
                "localhost:http", "localhost:", "localhost:123456", "[::1", "[::1]x", "::1", "", None,
                "127.0.0.1:8055@evil.example", "127.0.0.1 evil.example"):
        assert not host_allowed(bad, LOCAL, any_ip_literal=False), bad


def test_on_a_wildcard_bind_any_ip_literal_is_this_port_but_no_other_name_is():
    for good in ("172.18.0.2:8055", "[fe80::1]:8055", "localhost"):
        assert host_allowed(good, LOCAL, any_ip_literal=True), good
    for bad in ("hostd:8055", "evil.example", "[evil]", "300.1.1.1"):
        assert not host_allowed(bad, LOCAL, any_ip_literal=True), bad


def test_the_bind_address_and_configured_names_are_allowed_too():
    port = HttpPort(("127.0.0.1", free_loopback_port()), allowed_hosts=["Prometheus.Lab"])
    try:
        assert port._host_allowed("prometheus.lab:8055") and port._host_allowed("127.0.0.1")
        assert not port._host_allowed("evil.example")
    finally:
        port.server.server_close()
