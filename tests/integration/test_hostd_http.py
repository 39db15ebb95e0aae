"""hostd's HTTP port for real: a hostd process, two agents speaking the protocol over real
ZeroMQ, then /metrics (checked by Debian's promtool), /status.json and a 404."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import zmq

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
                                   stats_keys=("usage_bytes", "swap_used_bytes", "workload_touches_per_s")), 1))
            agents.append(sock)
        deadline = time.monotonic() + 15
        metrics = b""
        while time.monotonic() < deadline:
            for seq, sock in enumerate(agents, start=2):
                sock.send(encode(Status(balloon_pages=0, acked_target_seq=0, refused_pages=0, agent_state="idle",
                                        stats=(300 * MiB, 0, 1000.0),
                                        ws_touched_ratio=0.5, ws_method="referenced", ws_period_ms=1000), seq))
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
