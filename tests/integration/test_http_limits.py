"""The HTTP port against clients that misbehave, over real loopback sockets (review S15, S16):
strict JSON with an infinite ρ, the Host check, slowloris, and dashboards that stop reading.
Each attack is bounded in connections and in time, and ends by itself."""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from hostd.http import HttpPort
from tests.conftest import free_loopback_port
from tests.unit.test_jsonout import strict_loads

pytestmark = [pytest.mark.integration]


def snapshot(uptime_ms: int, vms: int = 2, rho: float = math.inf, padding: int = 0) -> dict[str, Any]:
    host = {"uptime_ms": uptime_ms, "state": "low", "free_bytes": -4096, "host_memory_bytes": 4096,
            "thresholds_bytes": {"high": 0, "soft": 0, "hard": 0, "low": 0}, "rho_max": rho}
    return {"host": host, "vms": [
        {"vm_id": f"vm{n}", "alive": True, "rho": rho, "memsz_bytes": 1 << 29, "granted_bytes": 0,
         "alloc_target_bytes": 0, "balloon_bytes": 0, "active_bytes": None, "swap_current_bytes": float("nan"),
         "padding": "x" * padding} for n in range(vms)]}


@contextlib.contextmanager
def http_port(**options: Any) -> Iterator[HttpPort]:
    port = HttpPort(("127.0.0.1", free_loopback_port()), **options)
    port.start()
    try:
        yield port
    finally:
        port.close()


def request(port: int, path: str, host: str | None = "127.0.0.1", method: str = "GET",
            timeout_s: float = 5) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        head = f"{method} {path} HTTP/1.1\r\n" + (f"Host: {host}\r\n" if host is not None else "")
        sock.sendall((head + "Connection: close\r\n\r\n").encode())
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    status_line, _, rest = reply.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def open_stream(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    return sock


def read_updates(sock: socket.socket, count: int) -> tuple[bytes, list[Any]]:
    """The response head and the first `count` `data:` lines, each parsed strictly."""
    with sock.makefile("rb") as stream:
        head = b""
        while (line := stream.readline()) not in (b"\r\n", b""):
            head += line
        updates = []
        while len(updates) < count:
            line = stream.readline()
            assert line, "stream ended"
            if line.startswith(b"data: "):
                updates.append(strict_loads(line[6:]))
    return head, updates


def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.05)


def test_an_infinite_rho_still_gives_strict_json_on_status_json_and_the_stream():
    with http_port() as port:
        port.publish_events([{"event": "target", "vm": "vm0", "rho": math.inf, "t_ms": 5}])
        port.publish(snapshot(1000))
        code, body = request(port.address[1], "/status.json")
        assert code == 200
        document = strict_loads(body)
        assert [vm["rho"] for vm in document["vms"]] == [None, None]
        assert document["host"]["rho_max"] is None and document["vms"][0]["swap_current_bytes"] is None
        sock = open_stream(port.address[1])
        try:
            with sock.makefile("rb") as stream:
                head = stream.readline()
                while stream.readline() != b"\r\n":
                    pass
                first = strict_loads(stream.readline().removeprefix(b"data: "))
                port.publish(snapshot(2000, rho=-math.inf))
                assert stream.readline() == b"\n"
                second = strict_loads(stream.readline().removeprefix(b"data: "))
        finally:
            sock.close()
        assert b" 200 " in head
        assert first["events"][0]["rho"] is None and first["snapshot"]["vms"][0]["rho"] is None
        assert first["history"][-1]["vms"]["vm0"]["swap"] is None  # the timeline sample record
        assert second["snapshot"]["host"]["uptime_ms"] == 2000 and second["snapshot"]["vms"][1]["rho"] is None


def test_only_requests_naming_this_port_are_answered():
    with http_port() as port:
        number = port.address[1]
        port.publish(snapshot(1000, rho=1.0))
        for host in ("127.0.0.1", f"127.0.0.1:{number}", "localhost", f"localhost:{number}", f"[::1]:{number}"):
            assert request(number, "/status.json", host)[0] == 200, host
        for host in ("evil.example", f"evil.example:{number}", f"rebind.127.0.0.1.nip.io:{number}"):
            code, body = request(number, "/status.json", host)
            assert (code, body) == (421, b"wrong Host header for this port\n"), host
            assert request(number, "/events", host)[0] == 421
            assert request(number, "/metrics", host)[0] == 421
        assert request(number, "/status.json", None)[0] == 400
        assert port.wrong_host == 10
        for method in ("POST", "PUT", "DELETE"):
            assert request(number, "/status.json", method=method)[0] == 501  # still read-only


def test_slowloris_holds_a_bounded_number_of_threads_and_lets_go_by_itself():
    """500 connections that never finish their request: at most 64 are served (each has its
    thread), the rest get 503 at once; the 64 are cut at the request deadline, even those
    trickling a byte at a time, and then the port serves again."""
    with http_port(request_timeout_s=2.0) as port:
        number = port.address[1]
        threads_before = threading.active_count()
        clients: list[socket.socket] = []
        try:
            for _ in range(500):
                sock = socket.create_connection(("127.0.0.1", number), timeout=5)
                sock.sendall(b"GET /status.json HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
                clients.append(sock)
            wait_for(lambda: port.open_connections + port.refused_connections == 500, 10, "all 500 accepted")
            peak_threads = threading.active_count() - threads_before
            peak_open = port.open_connections
            assert peak_open == 64 and port.refused_connections == 436
            assert peak_threads <= 64
            assert request(number, "/status.json")[0] == 503  # full: refused, not queued
            trickling = [sock for sock in clients if _still_open(sock)][:8]
            for _ in range(3):  # a header byte every 0.5 s does not extend the deadline
                for sock in trickling:
                    with contextlib.suppress(OSError):
                        sock.send(b"X")
                time.sleep(0.5)
            wait_for(lambda: port.open_connections == 0, 6, "the slow requests to be cut")
            assert threading.active_count() <= threads_before + 1
            open_after = sum(_still_open(sock) for sock in clients)
            print(f"500 slowloris: {peak_open} served ({peak_threads} threads), "
                  f"{port.refused_connections} refused with 503; after the deadline "
                  f"{port.open_connections} served, {open_after} still open on the client side")
            assert open_after == 0
            port.publish(snapshot(1000, rho=1.0))
            assert request(number, "/status.json")[0] == 200
        finally:
            for sock in clients:
                sock.close()


def _still_open(sock: socket.socket) -> bool:
    """Whether the server has not closed this connection (reads what it sent, up to EOF)."""
    sock.setblocking(False)
    try:
        while sock.recv(65536):
            pass
        return False  # EOF
    except BlockingIOError:
        return True
    except OSError:
        return False  # reset
    finally:
        sock.setblocking(True)


def test_dashboards_that_stop_reading_are_dropped_and_a_new_one_gets_in():
    """16 streams whose clients never read hold every slot; with 64 KB snapshots published
    every 50 ms their buffers fill, the next update cannot be written within the write
    timeout, they are dropped, and a new dashboard is served. `publish` never waits for them."""
    with http_port(write_timeout_s=1.0) as port:
        number = port.address[1]
        stop = threading.Event()
        slowest_publish = [0.0]

        def publisher() -> None:
            uptime = 0
            while not stop.is_set():
                uptime += 50
                started = time.monotonic()
                port.publish(snapshot(uptime, vms=8, padding=8192))
                slowest_publish[0] = max(slowest_publish[0], time.monotonic() - started)
                time.sleep(0.05)

        feeder = threading.Thread(target=publisher, daemon=True)
        feeder.start()
        stalled = [open_stream(number, rcvbuf=4096) for _ in range(16)]
        try:
            wait_for(lambda: port._open_streams == 16, 10, "16 streams")
            started = time.monotonic()
            assert request(number, "/events")[0] == 503  # every slot taken
            served_after = None
            while served_after is None and time.monotonic() - started < 30:
                sock = open_stream(number)
                try:
                    head, (update,) = read_updates(sock, 1)
                    if b" 200 " in head.split(b"\r\n")[0]:
                        served_after = time.monotonic() - started
                        assert update["snapshot"]["host"]["uptime_ms"] > 0
                except (OSError, AssertionError):
                    pass
                finally:
                    sock.close()
                time.sleep(0.2)
            print(f"16 non-reading dashboards: a new one served after {served_after} s; "
                  f"{port.streams_dropped} dropped; slowest publish {slowest_publish[0] * 1000:.1f} ms")
            assert served_after is not None, "no dashboard served in 30 s"
            assert port.streams_dropped >= 1
        finally:
            stop.set()
            feeder.join(5)
            for sock in stalled:
                sock.close()
