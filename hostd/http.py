"""hostd's HTTP port: the live dashboard (`/`, pushed over server-sent events at `/events`),
Prometheus `/metrics` and `/status.json`.

A stdlib ThreadingHTTPServer in a daemon thread. It never touches the core: the main loop
publishes a fresh snapshot once a second (`publish`) and its decisions as they happen
(`publish_events`); requests read what was published, so a slow client cannot stall the
scheduler. On a host too big to keep the dashboard's history (> HISTORY_MAX_VMS vms) a
snapshot is made only while someone asks for one (`wants_snapshot`): at 2,000 vms making
it every second was a sixth of hostd's CPU; a request that finds no fresh snapshot waits
for the next one (≤ 1 s). The dashboard's files ship in the package (hostd/web): no CDN, works offline.

Read-only (POST, PUT and the rest get 501), and bounded against clients that misbehave
(review S16):
- `Host:` must name this port: localhost, 127.0.0.1, [::1], the bind address, or, bound to a
  wildcard address, any IP literal; with or without a port (the port is not compared: the
  compose lab may publish 8055 under another number). Anything else gets 421, a request
  without one 400: a DNS-rebinding page (evil.example resolving to 127.0.0.1) cannot read
  `/status.json`. An IP literal is never a rebinding: the browser connected to that address.
- The request line and headers must arrive within REQUEST_TIMEOUT_S in all (slowloris), and
  at most MAX_CONNECTIONS connections are served at once: the next one gets a 503 from the
  accepting thread and is closed, without a thread of its own.
- An event stream whose client stops reading is dropped once an update cannot be written
  within WRITE_TIMEOUT_S (its send buffer is kept small so that comes soon), freeing its
  slot for the next dashboard. Keepalives are written outside the lock `publish` takes.
- Every JSON body is strict JSON (`hostd.jsonout`: a non-finite number is null), and each
  published snapshot is encoded once, whatever the number of clients."""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import ipaddress
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from hostd.jsonout import dumps
from hostd.metrics import SnapshotCollector
from hostd.status_doc import StatusDocument
from hostd.timeline import sample_record

log = logging.getLogger(__name__)

MAX_EVENT_STREAMS = 16  # dashboards open at once; more get 503
MAX_CONNECTIONS = 64  # connections served at once (streams included); more get 503 and are closed
REQUEST_TIMEOUT_S = 10.0  # for the whole request line and headers
WRITE_TIMEOUT_S = 10.0  # for one response, or one event-stream update, to be taken by the client
STREAM_SEND_BUFFER = 32 << 10  # an event stream's socket send buffer (the kernel doubles it)
LISTEN_BACKLOG = 128
RECENT_EVENTS = 200  # decisions a newly opened dashboard starts with
KEEPALIVE_S = 15.0
HISTORY_SAMPLES = 300  # a newly opened dashboard starts with the last 5 minutes...
HISTORY_MAX_VMS = 64  # ...on a lab-sized host (2,000 vms × 300 samples would be ~100 MB)
DEMAND_WINDOW_S = 30.0  # a request keeps snapshots coming this long (Prometheus scrapes every 15 s)
FRESH_S = 2.0  # an older snapshot is stale: a request waits for the next publish
STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_ADDRESSES = frozenset({"", "0.0.0.0", "::"})
_BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
         b"Content-Length: 21\r\nRetry-After: 1\r\nConnection: close\r\n\r\ntoo many connections\n")


class HttpPort:
    def __init__(self, address: tuple[str, int], allowed_hosts: Iterable[str] = (),
                 max_connections: int = MAX_CONNECTIONS, request_timeout_s: float = REQUEST_TIMEOUT_S,
                 write_timeout_s: float = WRITE_TIMEOUT_S) -> None:
        """`allowed_hosts`: more names `Host:` may carry (e.g. the name Prometheus scrapes by)."""
        self.request_timeout_s = request_timeout_s
        self.write_timeout_s = write_timeout_s
        self._snapshot: StatusDocument | None = None
        self._changed = threading.Condition()
        self._version = 0  # bumped by every publish: streams wait for the next one
        self._events: collections.deque[tuple[int, dict[str, Any]]] = collections.deque(maxlen=RECENT_EVENTS)
        self._history: collections.deque[dict[str, Any]] = collections.deque(maxlen=HISTORY_SAMPLES)
        self._event_count = 0
        self._streams = threading.BoundedSemaphore(MAX_EVENT_STREAMS)
        self._closing = False
        self._published_s = 0.0  # monotonic time of the last publish
        self._demand_s = -DEMAND_WINDOW_S  # monotonic time of the last request for a snapshot
        self._open_streams = 0
        self._encoding = threading.Lock()  # held while a snapshot is encoded, never with _changed
        self._encoded: tuple[int, str] = (-1, "null")  # (version, its snapshot as JSON)
        self.streams_dropped = 0  # event streams whose client stopped reading
        self.wrong_host = 0  # requests refused for their Host header
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(lambda: self._snapshot))
        self._any_ip_literal = address[0] in WILDCARD_ADDRESSES
        self._allowed_names = LOCAL_NAMES | {_host_name(name) for name in allowed_hosts} | (
            frozenset() if self._any_ip_literal else {_host_name(address[0])})
        port = self

        class Handler(BaseHTTPRequestHandler):
            timeout = request_timeout_s

            def setup(self) -> None:
                super().setup()
                self.rfile.close()  # unread; closed so that the socket's last close is real
                # every read until the headers are in shares one deadline
                self.rfile = io.BufferedReader(_DeadlineReader(self.connection,
                                                               time.monotonic() + port.request_timeout_s))

            def do_GET(self) -> None:
                self.connection.settimeout(port.write_timeout_s)
                if not port._host_allowed(self.headers.get("Host")):
                    port.wrong_host += 1
                    missing = not self.headers.get("Host")
                    port._reply(self, 400 if missing else 421, "text/plain; charset=utf-8",
                                b"no Host header\n" if missing else b"wrong Host header for this port\n")
                    return
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    port._await_fresh_snapshot()
                    port._reply(self, 200, CONTENT_TYPE_LATEST, generate_latest(port.registry))
                elif path == "/status.json":
                    version, snapshot = port._await_fresh_snapshot()
                    body = port._encode(version, snapshot) if snapshot is not None else "{}"
                    port._reply(self, 200, "application/json", body.encode("ascii"))
                elif path in ("/", "/index.html"):
                    port._reply(self, 200, "text/html; charset=utf-8", _asset("index.html"))
                elif path.startswith("/static/") and path.removeprefix("/static/") in STATIC:
                    name = path.removeprefix("/static/")
                    port._reply(self, 200, STATIC[name], _asset(name))
                elif path == "/events":
                    port._stream(self)
                else:
                    port._reply(self, 404, "text/plain; charset=utf-8", b"not found\n")

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("http: " + format, *args)

        self.server = _BoundedServer(address, Handler, max_connections)
        self.address = self.server.server_address
        self._thread = threading.Thread(target=self.server.serve_forever, name="hostd-http", daemon=True)

    @property
    def open_connections(self) -> int:
        return self.server.open_connections

    @property
    def refused_connections(self) -> int:
        return self.server.refused

    def _host_allowed(self, header: str | None) -> bool:
        return host_allowed(header, self._allowed_names, self._any_ip_literal)

    def wants_snapshot(self, vm_count: int) -> bool:
        """Whether the main loop should make and publish a snapshot now."""
        with self._changed:
            return (vm_count <= HISTORY_MAX_VMS or self._open_streams > 0
                    or time.monotonic() - self._demand_s < DEMAND_WINDOW_S)

    def _await_fresh_snapshot(self) -> tuple[int, StatusDocument | None]:
        """The latest snapshot and its version, waiting (≤ 2 publish periods) for a new one
        if it is stale."""
        with self._changed:
            self._demand_s = time.monotonic()
            if time.monotonic() - self._published_s > FRESH_S:
                version = self._version
                self._changed.wait_for(functools.partial(self._moved_on, version), 2 * FRESH_S)
            return self._version, self._snapshot

    def _encode(self, version: int, snapshot: StatusDocument | None) -> str:
        """`snapshot` (published as `version`) as JSON, encoded once for every client."""
        with self._encoding:
            if self._encoded[0] != version:
                self._encoded = (version, dumps(snapshot))
            return self._encoded[1]

    @staticmethod
    def _reply(handler: BaseHTTPRequestHandler, code: int, content_type: str, body: bytes) -> None:
        handler.send_response(code)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Cache-Control", "no-store")
        handler.end_headers()
        handler.wfile.write(body)

    def _stream(self, handler: BaseHTTPRequestHandler) -> None:
        """Server-sent events: the recent decisions and the latest snapshot at once, then each
        new snapshot (once a second) with the decisions since the last one."""
        if not self._streams.acquire(blocking=False):
            self._reply(handler, 503, "text/plain; charset=utf-8", b"too many dashboards open\n")
            return
        try:
            with self._changed:
                self._open_streams += 1
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SEND_BUFFER)
            handler.send_response(200)
            handler.send_header("Content-Type", "text/event-stream")
            handler.send_header("Cache-Control", "no-store")
            handler.end_headers()
            with self._changed:
                version, seen = self._version, 0
                events = [event for _, event in self._events]
                if self._events:
                    seen = self._events[-1][0]
                snapshot = self._snapshot
                history = list(self._history)
            self._send_update(handler, self._encode(version, snapshot), events, history)
            while True:
                with self._changed:
                    self._changed.wait_for(functools.partial(self._moved_on, version), KEEPALIVE_S)
                    if self._closing:
                        break
                    moved = self._version != version
                    if moved:
                        version = self._version
                        events = [event for number, event in self._events if number > seen]
                        if self._events:
                            seen = self._events[-1][0]
                        snapshot = self._snapshot
                if moved:
                    self._send_update(handler, self._encode(version, snapshot), events)
                else:  # written outside the lock: a stuck client never holds up publish
                    handler.wfile.write(b": keepalive\n\n")
        except TimeoutError:
            # the client stopped reading: drop it (reset: nothing more is worth delivering)
            self.streams_dropped += 1
            log.info("http: dropped an event stream from %s: an update waited %g s to be taken",
                     handler.client_address[0], self.write_timeout_s)
            handler.close_connection = True
            with contextlib.suppress(OSError):
                handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            handler.close_connection = True  # the dashboard went away
        finally:
            with self._changed:
                self._open_streams -= 1
            self._streams.release()

    def _moved_on(self, version: int) -> bool:
        return self._version != version or self._closing

    @staticmethod
    def _send_update(handler: BaseHTTPRequestHandler, snapshot_json: str, events: list[dict[str, Any]],
                     history: list[dict[str, Any]] | None = None) -> None:
        data = '{"snapshot":' + snapshot_json + ',"events":' + dumps(events)
        if history:  # timeline sample records (hostd/timeline.py), oldest first
            data += ',"history":' + dumps(history)
        handler.wfile.write(b"data: " + data.encode("ascii") + b"}\n\n")

    def start(self) -> None:
        self._thread.start()

    def publish(self, snapshot: StatusDocument, sample: dict[str, Any] | None = None) -> None:
        """`sample`: the snapshot's timeline record, when the caller made it already."""
        if len(snapshot["vms"]) > HISTORY_MAX_VMS:
            sample = None
        elif sample is None:
            sample = sample_record(snapshot)
        with self._changed:
            self._snapshot = snapshot
            self._published_s = time.monotonic()
            if sample is not None:
                self._history.append(sample)
            self._version += 1
            self._changed.notify_all()

    def publish_events(self, events: list[dict[str, Any]]) -> None:
        """Decisions as they happen; streams send them with the next snapshot."""
        with self._changed:
            for event in events:
                self._event_count += 1
                self._events.append((self._event_count, event))

    def close(self) -> None:
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self.server.shutdown()
        self.server.server_close()


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most `max_connections` at once: the rest get a 503 written
    without blocking from the accepting thread, and are closed."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 max_connections: int) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        self._count_lock = threading.Lock()
        self.open_connections = 0
        self.refused = 0
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            try:
                request.setblocking(False)
                request.send(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        with self._count_lock:
            self.open_connections += 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release()  # no thread started
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._count_lock:
            self.open_connections -= 1
        self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that resets or times out is no error of hostd's, and must not fill its log
        log.debug("http: connection from %s ended with an error", client_address, exc_info=True)


class _DeadlineReader(io.RawIOBase):
    """The socket's reads, all done by `deadline` (a monotonic time): a client that sends its
    request a byte at a time cannot keep a connection (and its thread) for longer."""

    def __init__(self, connection: socket.socket, deadline: float) -> None:
        super().__init__()
        self._connection = connection
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request not received in time")
        self._connection.settimeout(remaining)
        return self._connection.recv_into(buffer)


def host_allowed(header: str | None, names: frozenset[str], any_ip_literal: bool) -> bool:
    """Whether a `Host:` header value names this port: one of `names` (lower case, IPv6
    without brackets) or, with `any_ip_literal`, any IP address; with or without a port."""
    if not header:
        return False
    text = header.strip().lower()
    if text.startswith("["):  # [v6] or [v6]:port
        name, bracket, port = text[1:].partition("]")
        if not bracket:
            return False
    else:
        name, colon, port = text.partition(":")
        port = colon + port
    if port and not (port.startswith(":") and port[1:].isdigit() and len(port) <= 6):
        return False
    name = name.rstrip(".")
    if name in names:
        return True
    if not any_ip_literal or not name:
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _host_name(text: str) -> str:
    name = text.strip().lower().rstrip(".")
    return name[1:-1] if name.startswith("[") and name.endswith("]") else name


def _asset(name: str) -> bytes:
    return resources.files("hostd").joinpath("web", name).read_bytes()
