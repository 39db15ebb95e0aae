"""Run balloon-hostd as a real process on free loopback ports and talk to it like balloonctl."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hostd.client import ControlCredentials, HostdClient
from tests.conftest import free_loopback_port


class HostdProcess:
    def __init__(self, workdir: Path, *flags: str, agent_port: int | None = None,
                 control_port: int | None = None) -> None:
        self.agent_port = agent_port or free_loopback_port()
        self.control_port = control_port or free_loopback_port()
        self.agent_endpoint = f"tcp://127.0.0.1:{self.agent_port}"
        self.control_endpoint = f"tcp://127.0.0.1:{self.control_port}"
        self.http_port = free_loopback_port()
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.log_path = workdir / f"hostd-{self.agent_port}-{time.monotonic_ns()}.log"
        self.event_log = workdir / "events.jsonl"
        # Each test's hostd has its own credential and saved settings: nothing leaks between tests.
        self.token_file = workdir / f"control-{self.control_port}.token"
        self.settings_file = workdir / f"settings-{self.control_port}.json"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hostd", "--agent-endpoint", self.agent_endpoint,
             "--control-endpoint", self.control_endpoint, "--event-log", str(self.event_log),
             "--http", f"127.0.0.1:{self.http_port}", "--control-token-file", str(self.token_file),
             "--settings-file", str(self.settings_file), *flags],
            stderr=self._log, text=True,
        )
        self.client = HostdClient(self.control_endpoint,
                                  credentials=ControlCredentials.from_environment(str(self.token_file)))
        try:
            self.wait_until(lambda s: True, 10, "hostd to answer")
        except BaseException:  # a hostd that never answered is not left running (nor its log open)
            self.stop(kill=True)
            raise

    def status(self, timeout_ms: int = 2000) -> dict[str, Any]:
        return self.client.status(timeout_ms)

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "balloonctl", "--endpoint", self.control_endpoint,
                               "--token-file", str(self.token_file), *args],
                              capture_output=True, text=True, timeout=30)

    def wait_until(self, predicate, timeout_s: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] | None = None
        while True:
            assert self.process.poll() is None, f"hostd exited: {self.log_path.read_text()[-3000:]}"
            try:
                last = self.status(500)
                if predicate(last):
                    return last
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last status: {last}")
            time.sleep(0.2)

    def stop(self, kill: bool = False) -> None:
        if self.process.poll() is None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
            self.process.wait(timeout=10)
        self._log.close()


def vm(snapshot: dict[str, Any], vm_id: str) -> dict[str, Any]:
    return next(v for v in snapshot["vms"] if v["vm_id"] == vm_id)
