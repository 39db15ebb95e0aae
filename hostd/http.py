"""hostd's HTTP port: the live dashboard (`/`, pushed over server-sent events at `/events`),
Prometheus `/metrics` and `/status.json`.

A stdlib ThreadingHTTPServer in a daemon thread. It never touches the core: the main loop
publishes a fresh snapshot once a second (`publish`) and its decisions as they happen
(`publish_events`); requests read what was published, so a slow client cannot stall the
scheduler. On a host too big to keep the dashboard's history (> HISTORY_MAX_VMS vms) a
snapshot is made only while someone asks for one (`wants_snapshot`): at 2,000 vms making
it every second was a sixth of hostd's CPU; a request that finds no fresh snapshot waits
for the next one (≤ 1 s). The dashboard's files ship in the package (hostd/web): no CDN, works offline."""

from __future__ import annotations

import collections
import functools
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from hostd.metrics import SnapshotCollector
from hostd.timeline import sample_record

log = logging.getLogger(__name__)

MAX_EVENT_STREAMS = 16  # dashboards open at once; more get 503
RECENT_EVENTS = 200  # decisions a newly opened dashboard starts with
KEEPALIVE_S = 15.0
HISTORY_SAMPLES = 300  # a newly opened dashboard starts with the last 5 minutes...
HISTORY_MAX_VMS = 64  # ...on a lab-sized host (2,000 vms × 300 samples would be ~100 MB)
DEMAND_WINDOW_S = 30.0  # a request keeps snapshots coming this long (Prometheus scrapes every 15 s)
FRESH_S = 2.0  # an older snapshot is stale: a request waits for the next publish
STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


class HttpPort:
    def __init__(self, address: tuple[str, int]) -> None:
        self._snapshot: dict[str, Any] | None = None
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
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(lambda: self._snapshot))
        port = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    port._await_fresh_snapshot()
                    port._reply(self, 200, CONTENT_TYPE_LATEST, generate_latest(port.registry))
                elif path == "/status.json":
                    body = json.dumps(port._await_fresh_snapshot() or {}, separators=(",", ":")).encode()
                    port._reply(self, 200, "application/json", body)
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

        self.server = ThreadingHTTPServer(address, Handler)
        self.server.daemon_threads = True
        self.address = self.server.server_address
        self._thread = threading.Thread(target=self.server.serve_forever, name="hostd-http", daemon=True)

    def wants_snapshot(self, vm_count: int) -> bool:
        """Whether the main loop should make and publish a snapshot now."""
        with self._changed:
            return (vm_count <= HISTORY_MAX_VMS or self._open_streams > 0
                    or time.monotonic() - self._demand_s < DEMAND_WINDOW_S)

    def _await_fresh_snapshot(self) -> dict[str, Any] | None:
        """The latest snapshot, waiting (≤ 2 publish periods) for a new one if it is stale."""
        with self._changed:
            self._demand_s = time.monotonic()
            if time.monotonic() - self._published_s > FRESH_S:
                version = self._version
                self._changed.wait_for(functools.partial(self._moved_on, version), 2 * FRESH_S)
            return self._snapshot

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
            self._send_update(handler, snapshot, events, history)
            while not self._closing:
                with self._changed:
                    self._changed.wait_for(functools.partial(self._moved_on, version), KEEPALIVE_S)
                    if self._version == version:
                        handler.wfile.write(b": keepalive\n\n")
                        handler.wfile.flush()
                        continue
                    version = self._version
                    events = [event for number, event in self._events if number > seen]
                    if self._events:
                        seen = self._events[-1][0]
                    snapshot = self._snapshot
                self._send_update(handler, snapshot, events)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the dashboard went away
        finally:
            with self._changed:
                self._open_streams -= 1
            self._streams.release()

    def _moved_on(self, version: int) -> bool:
        return self._version != version or self._closing

    @staticmethod
    def _send_update(handler: BaseHTTPRequestHandler, snapshot: dict[str, Any] | None,
                     events: list[dict[str, Any]], history: list[dict[str, Any]] | None = None) -> None:
        update: dict[str, Any] = {"snapshot": snapshot, "events": events}
        if history:
            update["history"] = history  # timeline sample records (hostd/timeline.py), oldest first
        data = json.dumps(update, separators=(",", ":"))
        handler.wfile.write(b"data: " + data.encode() + b"\n\n")
        handler.wfile.flush()

    def start(self) -> None:
        self._thread.start()

    def publish(self, snapshot: dict[str, Any], sample: dict[str, Any] | None = None) -> None:
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


def _asset(name: str) -> bytes:
    return resources.files("hostd").joinpath("web", name).read_bytes()
