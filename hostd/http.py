"""hostd's HTTP port: Prometheus `/metrics` and `/status.json` (the web dashboard will join).

A stdlib ThreadingHTTPServer in a daemon thread. It never touches the core: the main loop
publishes a fresh snapshot once a second (`publish`) and requests read the latest one, so a
slow scraper cannot stall the scheduler and no lock is needed (one reference assignment)."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from hostd.metrics import SnapshotCollector

log = logging.getLogger(__name__)


class HttpPort:
    def __init__(self, address: tuple[str, int]) -> None:
        self._snapshot: dict[str, Any] | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(lambda: self._snapshot))
        port = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    port._reply(self, 200, CONTENT_TYPE_LATEST, generate_latest(port.registry))
                elif path == "/status.json":
                    body = json.dumps(port._snapshot or {}, separators=(",", ":")).encode()
                    port._reply(self, 200, "application/json", body)
                elif path == "/":
                    port._reply(self, 200, "text/plain; charset=utf-8",
                                b"balloon-hostd: /metrics (Prometheus), /status.json\n")
                else:
                    port._reply(self, 404, "text/plain; charset=utf-8", b"not found\n")

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("http: " + format, *args)

        self.server = ThreadingHTTPServer(address, Handler)
        self.server.daemon_threads = True
        self.address = self.server.server_address
        self._thread = threading.Thread(target=self.server.serve_forever, name="hostd-http", daemon=True)

    @staticmethod
    def _reply(handler: BaseHTTPRequestHandler, code: int, content_type: str, body: bytes) -> None:
        handler.send_response(code)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Cache-Control", "no-store")
        handler.end_headers()
        handler.wfile.write(body)

    def start(self) -> None:
        self._thread.start()

    def publish(self, snapshot: dict[str, Any]) -> None:
        self._snapshot = snapshot

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
