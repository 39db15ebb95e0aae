"""hostd's HTTP port for real: a hostd process, two agents speaking the protocol over real
ZeroMQ, then /metrics (checked by Debian's promtool), /status.json and a 404."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import zmq

from hostd.server import EventLog
from protocol import Hello, Status, encode
from tests.conftest import require
from tests.integration.hostd_proc import HostdProcess

pytestmark = [pytest.mark.integration]
MiB = 1 << 20


def fetch(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def test_metrics_and_status_json_on_the_http_port(tmp_path: Path) -> None:
    hostd = HostdProcess(tmp_path, "--host-memory", "1GiB", "--report-interval", "200ms")
    context = zmq.Context()
    try:
        agents = []
        for vm_id in ("web", "db"):
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, vm_id.encode())
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(hostd.agent_endpoint)
            sock.send(encode(Hello(vm_id=vm_id, memsz_bytes=512 * MiB, agent_version="test", page_kind="vpn",
                                   supports_2m=False, cgroup_version=2, max_batch_pages=512, held_pages=0,
                                   last_host_session_id=None,
                                   stats_keys=("swap_used_bytes", "workload_touches_per_s")), 1))
            agents.append(sock)
        deadline = time.monotonic() + 15
        metrics = b""
        while time.monotonic() < deadline:
            for seq, sock in enumerate(agents, start=2):
                sock.send(encode(Status(balloon_pages=0, acked_target_seq=0, refused_pages=0, agent_state="idle",
                                        usage_bytes=300 * MiB, ws_touched_ratio=0.5, ws_samples=1,
                                        ws_current_ratio=None, ws_method="referenced", stats=(0, 1000.0)), seq))
            code, content_type, metrics = fetch(f"{hostd.http_url}/metrics")
            if code == 200 and b'balloonlab_vm_alive{vm="db"} 1.0' in metrics and b'vm="web"' in metrics:
                break
            time.sleep(0.2)
        assert b'balloonlab_vm_alive{vm="db"} 1.0' in metrics, metrics.decode()[-2000:]
        assert content_type.startswith("text/plain")
        assert b'balloonlab_vm_workload_touches_per_second{vm="web"} 1000.0' in metrics
        assert b"balloonlab_host_memory_bytes 1.073741824e+09" in metrics

        require(shutil.which("promtool") is not None, "needs promtool (apt-get install prometheus)")
        (tmp_path / "metrics.txt").write_bytes(metrics)
        lint = subprocess.run(["promtool", "check", "metrics"], input=metrics, capture_output=True, timeout=30)
        print(f"promtool check metrics: exit {lint.returncode} {lint.stdout.decode()}{lint.stderr.decode()}")
        assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()

        code, content_type, body = fetch(f"{hostd.http_url}/status.json")
        assert code == 200 and content_type == "application/json"
        assert sorted(vm["vm_id"] for vm in json.loads(body)["vms"]) == ["db", "web"]
        assert fetch(f"{hostd.http_url}/nope")[0] == 404

        # the dashboard's page and its pushed updates: first the last minutes, then a snapshot a second
        code, content_type, page = fetch(f"{hostd.http_url}/")
        assert code == 200 and content_type.startswith("text/html") and b"/static/app.js" in page
        assert fetch(f"{hostd.http_url}/static/app.js")[0] == 200
        assert fetch(f"{hostd.http_url}/static/../config.py")[0] == 404
        with urllib.request.urlopen(f"{hostd.http_url}/events", timeout=10) as stream:
            assert stream.headers["Content-Type"] == "text/event-stream"
            updates = []
            while len(updates) < 2:
                line = stream.readline()
                if line.startswith(b"data: "):
                    updates.append(json.loads(line[6:]))
        first, second = updates
        assert {"snapshot", "events", "history"} <= set(first)
        assert first["history"][-1]["kind"] == "sample" and "web" in first["history"][-1]["vms"]
        assert any(event["event"] == "join" for event in first["events"])
        assert "history" not in second
        assert second["snapshot"]["host"]["uptime_ms"] > first["snapshot"]["host"]["uptime_ms"]
    finally:
        context.destroy(linger=0)
        hostd.stop()


def test_http_port_in_use_is_a_clear_startup_error(tmp_path: Path) -> None:
    first = HostdProcess(tmp_path)
    try:
        port = first.http_port
        result = subprocess.run([sys.executable, "-m", "hostd", "--agent-endpoint", "tcp://127.0.0.1:0",
                                 "--control-endpoint", "tcp://127.0.0.1:0", "--http", f"127.0.0.1:{port}"],
                                capture_output=True, text=True, timeout=30, cwd=Path(__file__).parents[2])
        assert result.returncode == 1
        assert "cannot start" in result.stderr and "in use" in result.stderr
    finally:
        first.stop()


def test_http_on_a_public_address_needs_allow_plain_remote(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "hostd", "--http", "0.0.0.0:8055"], capture_output=True, text=True,
                            timeout=30, cwd=Path(__file__).parents[2])
    assert result.returncode == 2 and "only loopback" in result.stderr


class _Reporter:
    """Agents `web` and `db` (512 MiB each) that say hello and report every 200 ms until closed."""

    def __init__(self, hostd: HostdProcess) -> None:
        self.context = zmq.Context()
        self.sockets = []
        for vm_id in ("web", "db"):
            sock = self.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, vm_id.encode())
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(hostd.agent_endpoint)
            sock.send(encode(Hello(vm_id=vm_id, memsz_bytes=512 * MiB, agent_version="test", page_kind="vpn",
                                   supports_2m=False, cgroup_version=2, max_batch_pages=512, held_pages=0,
                                   last_host_session_id=None, stats_keys=()), 1))
            self.sockets.append(sock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._report, daemon=True)
        self._thread.start()

    def _report(self) -> None:
        seq = 2
        while not self._stop.wait(0.2):
            for sock in self.sockets:
                sock.send(encode(Status(balloon_pages=0, acked_target_seq=0, refused_pages=0, agent_state="idle",
                                        usage_bytes=300 * MiB, ws_touched_ratio=0.5, ws_samples=1,
                                        ws_current_ratio=None, ws_method="referenced", stats=()), seq))
            seq += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.context.destroy(linger=0)


def strict_loads(text: bytes) -> Any:
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_a_vm_allocated_nothing_leaves_status_json_and_the_stream_strict_json(tmp_path: Path) -> None:
    """`balloonctl host host_memory=4KiB` allocated the vms 0 pages: ρ = ∞ (review S15). Now it is
    refused, and at the smallest host memory allowed /status.json and every pushed update stay
    JSON that JSON.parse and jq accept."""
    hostd = HostdProcess(tmp_path, "--host-memory", "1GiB", "--report-interval", "200ms", "--balance-period", "1s",
                         "--timeline", str(tmp_path / "timeline.jsonl"))
    agents = _Reporter(hostd)
    try:
        hostd.wait_until(lambda s: s["host"]["vms_alive"] == 2, 10, "two vms")
        refused = hostd.ctl("host", "host_memory=4KiB")
        assert refused.returncode == 1 and "at least 16 MiB" in refused.stderr
        assert hostd.ctl("host", "host_memory=16MiB").returncode == 0
        deadline = time.monotonic() + 15
        rhos: list[Any] = []
        while time.monotonic() < deadline:
            code, content_type, body = fetch(f"{hostd.http_url}/status.json")
            assert code == 200 and content_type == "application/json"
            document = strict_loads(body)  # every time, not only the last
            rhos = [vm["rho"] for vm in document["vms"]]
            if document["host"]["state"] == "low":
                break
            time.sleep(0.3)
        print(f"host_memory 4 KiB: state {document['host']['state']}, ρ {rhos}")
        assert document["host"]["state"] == "low"
        with urllib.request.urlopen(f"{hostd.http_url}/events", timeout=10) as stream:
            updates = []
            while len(updates) < 3:
                line = stream.readline()
                if line.startswith(b"data: "):
                    updates.append(strict_loads(line[6:]))
        assert updates[-1]["snapshot"]["host"]["host_memory_bytes"] == 16 * MiB
        if EventLog.__module__ == "hostd.eventlog":  # once server.py writes through hostd/eventlog.py
            for path in (hostd.event_log, tmp_path / "timeline.jsonl"):
                for line in path.read_text().splitlines():
                    strict_loads(line.encode())
    finally:
        agents.close()
        hostd.stop()


def raw_get(port: int, host: str | None, path: str = "/status.json") -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\n".encode() + (f"Host: {host}\r\n".encode() if host else b"")
                     + b"Connection: close\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return int(reply.split(b" ", 2)[1])


def proc_counts(pid: int) -> tuple[int, int]:
    """(threads, open fds) of a process."""
    threads = int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                       if line.startswith("Threads:")).split()[1])
    return threads, len(os.listdir(f"/proc/{pid}/fd"))


def test_hostd_http_answers_only_its_own_host_and_survives_500_slowloris_connections(tmp_path: Path) -> None:
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 gets 421. Slowloris: 500
    connections that never finish their headers hold at most 64 threads, the rest are refused
    at once, and hostd lets go of all of them by itself at the 10 s request deadline."""
    hostd = HostdProcess(tmp_path, "--host-memory", "1GiB")
    try:
        port = hostd.http_port
        assert raw_get(port, f"127.0.0.1:{port}") == 200 and raw_get(port, f"localhost:{port}") == 200
        assert raw_get(port, f"evil.example:{port}") == 421 and raw_get(port, "evil.example", "/events") == 421
        assert raw_get(port, None) == 400
        threads_before, fds_before = proc_counts(hostd.process.pid)
        clients = []
        started = time.monotonic()
        try:
            for _ in range(500):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                clients.append(sock)
            time.sleep(1)
            threads_peak, fds_peak = proc_counts(hostd.process.pid)
            assert raw_get(port, "127.0.0.1") == 503  # full: an honest request is refused, not queued
            assert hostd.status()["host"]["vms_alive"] == 0  # the control plane is unaffected
            while proc_counts(hostd.process.pid)[0] > threads_before and time.monotonic() - started < 20:
                time.sleep(0.2)
            released_s = time.monotonic() - started
            threads_after, fds_after = proc_counts(hostd.process.pid)
        finally:
            for sock in clients:
                sock.close()
        print(f"500 slowloris connections: hostd threads {threads_before} → {threads_peak} → {threads_after}, "
              f"fds {fds_before} → {fds_peak} → {fds_after}; released after {released_s:.1f} s")
        assert threads_peak - threads_before <= 64
        assert fds_peak - fds_before <= 64 + 8
        assert threads_after <= threads_before, "the slow connections were never cut"
        assert raw_get(port, "127.0.0.1") == 200
    finally:
        hostd.stop()
