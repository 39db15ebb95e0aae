"""hostd's I/O: two ROUTER sockets, the clock and the event log, around `HostCore`.

One thread: a zmq.Poller loop over the agent and control ROUTERs that also runs the core's
tick (liveness, balance period) every 100 ms. Each wakeup handles every queued frame and
answers it without blocking. The core is synchronous and never touches a socket; an
exception out of it stops the daemon (the supervisor restarts it).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import secrets
import time
from pathlib import Path
from typing import IO, Any

import zmq

from hostd.cgroupfs import BackendError, CgroupfsBackend
from hostd.config import HostConfig, parse_http_address
from hostd.core import HostCore, Outgoing
from hostd.reclaim import HostReclaimer
from hostd.timeline import event_record, sample_record
from protocol.limits import MAX_CONTROL_FRAME_BYTES, MAX_FRAME_BYTES

log = logging.getLogger(__name__)

TICK_MS = 100
DISCOVERY_MS = 5_000  # containers labelled for a vm (docker_label) looked up this often
RECLAIM_MS = 1_000  # cgroups read and limits stepped once a second (vswap_step_bytes per step)
PUBLISH_MS = 1_000  # the HTTP port's snapshot and the timeline's samples: as fresh as the agents' reports
# With thousands of agents a status arrives every few hundred µs, and waking up for each
# one cost more than handling it. After a wakeup that only took in statuses (nothing was
# answered, so no agent is waiting on us) the loop waits this long to let frames queue up
# and handles them in one pass. Any wakeup that sent a reply (lock results, welcomes,
# control answers) polls again at once, so ballooning round trips are never slowed.
COALESCE_S = 0.010


def now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def raise_fd_limit() -> None:
    """Every agent is a TCP connection (a file descriptor): allow as many as the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class EventLog:
    """Appends one JSON line per event; also logs it at DEBUG."""

    def __init__(self, path: Path | None, session_id: str) -> None:
        self._file: IO[str] | None = None
        self._session_id = session_id
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", buffering=1)

    def write(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            line = json.dumps({"ts": round(time.time(), 3), "session": self._session_id, **event},
                              separators=(",", ":"))
            log.debug("event %s", line)
            if self._file is not None:
                self._file.write(line + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class TimelineFile:
    """`--timeline`: a sample per second and every decision, appended as JSON Lines."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", buffering=1)

    def write(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._file.close()


class HostServer:
    def __init__(self, config: HostConfig, context: zmq.Context[zmq.Socket[bytes]] | None = None) -> None:
        self.config = config
        self.session_id = f"h-{secrets.token_hex(4)}"
        self.core = HostCore(config, self.session_id, now_ms())
        self.context = context or zmq.Context()
        self.events = EventLog(config.event_log, self.session_id)
        self.timeline = TimelineFile(config.timeline) if config.timeline is not None else None
        self.stop_requested = False
        self._sent_in_pass = 0
        self._read_errors: dict[str, str] = {}  # vm → the last reason its cgroup could not be read
        self._authenticator: Any = None
        self.agent_socket = self._router(config.agent_endpoint, curve=True, max_frame_bytes=MAX_FRAME_BYTES)
        self.control_socket = self._router(config.control_endpoint, curve=False,
                                           max_frame_bytes=MAX_CONTROL_FRAME_BYTES)
        self.reclaimer: HostReclaimer | None = None
        if (config.host_targets or config.docker_label) and config.vswap:
            if config.vm_cgroups and os.geteuid() != 0:
                log.error("vms with a cgroup are configured (%s) but hostd is not root: host swap and blocking "
                          "are off (writing cgroup limits and freezers needs root)", ", ".join(config.vm_cgroups))
            else:
                self.reclaimer = HostReclaimer(config.host_targets, config.vswap_state_file,
                                               CgroupfsBackend(config.cgroup_root), docker_label=config.docker_label,
                                               docker_label_filter=config.docker_label_filter)
        self.http: Any = None
        http_address = parse_http_address(config.http_address)
        if http_address is not None:
            from hostd.http import HttpPort

            self.http = HttpPort(http_address)

    def _router(self, endpoint: str, curve: bool, max_frame_bytes: int) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished peer raises, never silently drops
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting agent takes its routing id back
        sock.setsockopt(zmq.SNDHWM, 10_000)
        if curve and self.config.curve_secret_key is not None:
            from protocol.keys import load_keypair

            pair = load_keypair(self.config.curve_secret_key)
            if pair.secret_key is None:
                raise ValueError(f"{self.config.curve_secret_key} holds no secret key")
            sock.curve_secretkey = pair.secret_key
            sock.curve_publickey = pair.public_key
            sock.curve_server = True
        sock.bind(endpoint)
        return sock

    def _start_authenticator(self) -> None:
        if self.config.curve_allowlist is None:
            return
        from zmq.auth.thread import ThreadAuthenticator

        # ZAP answers in its own thread, so handshakes never wait for the main loop.
        self._authenticator = ThreadAuthenticator(self.context)
        self._authenticator.start()
        self._authenticator.configure_curve(domain="*", location=str(self.config.curve_allowlist))
        log.info("CurveZMQ on; agents allowed from %s", self.config.curve_allowlist)

    def _send(self, out: Outgoing) -> None:
        self._sent_in_pass += len(out)
        for identity, frame in out:
            try:
                self.agent_socket.send_multipart([identity, frame], flags=zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # EHOSTUNREACH (peer gone) or EAGAIN (peer not reading)
                self.core.counters[f"send_failed_{exc.errno}"] += 1
        events = self.core.drain_events()
        if events:
            self.events.write(events)
            if self.timeline is not None:
                self.timeline.write([event_record(event) for event in events])
            if self.http is not None:
                self.http.publish_events(events)

    def _on_agent_readable(self) -> None:
        while True:
            try:
                parts = self.agent_socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(parts) != 2:
                self.core.protocol_errors["MALFORMED"] += 1
                parts = [parts[0], b""]
            self._send(self.core.handle_agent(parts[0], parts[1], now_ms()))

    def _on_control_readable(self) -> None:
        while True:
            try:
                parts = self.control_socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            reply, out = self.core.handle_control(parts[-1] if len(parts) == 2 else b"", now_ms())
            try:
                self.control_socket.send_multipart([parts[0], reply], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                self.core.counters["control_reply_failed"] += 1
            self._send(out)

    def _discover(self) -> None:
        """Containers labelled for a vm join the host targets (the config's own entries win)."""
        assert self.reclaimer is not None
        try:
            found = self.reclaimer.discover(self.config.docker_label, self.config.docker_label_filter)
        except BackendError as exc:
            if self._read_errors.get("*discovery*") != str(exc):
                log.warning("docker discovery: %s", exc)
                self._read_errors["*discovery*"] = str(exc)
            return
        self._read_errors.pop("*discovery*", None)
        for vm_id, target in found.items():
            if vm_id not in self.config.host_targets and self.reclaimer.targets.get(vm_id) != target:
                log.info("vm %s is container %s", vm_id, target.removeprefix("docker:"))
                self.reclaimer.targets[vm_id] = target
                self.core.set_host_target(vm_id, target)

    def _reclaim_step(self) -> None:
        """Read every configured cgroup, then carry out the core's host-swap and block actions."""
        assert self.reclaimer is not None
        for vm_id in self.reclaimer.targets:
            try:
                reading = self.reclaimer.read(vm_id)
            except BackendError as exc:
                if self._read_errors.get(vm_id) != str(exc):  # once per new reason, not every second
                    log.warning("vm %s: cannot read %s: %s", vm_id, self.reclaimer.targets[vm_id], exc)
                    self._read_errors[vm_id] = str(exc)
                self.core.cgroup_gone(vm_id, now_ms(), str(exc))
                continue
            self._read_errors.pop(vm_id, None)
            self.core.observe_cgroup(vm_id, reading.usage_bytes, reading.swap_bytes, reading.own_limit_bytes,
                                     now_ms())
        actions = self.core.host_actions(now_ms())
        failures = self.reclaimer.apply(actions)
        for vm_id, action, detail in failures:
            self.core.host_action_failed(vm_id, action, detail, now_ms())
        self.core.host_actions_succeeded({a[0] for a in actions} - {f[0] for f in failures})
        self._send([])

    def run(self) -> None:
        """Until `stop()` (from a signal handler)."""
        raise_fd_limit()
        self._start_authenticator()
        log.info("hostd session %s: agents on %s, control on %s, host memory %d MiB, τ=%g, balance every %d ms",
                 self.session_id, self.config.agent_endpoint, self.config.control_endpoint,
                 self.core.settings.host_memory_pages >> 8, self.core.settings.idle_tax_ratio,
                 self.core.settings.balance_period_ms)
        poller = zmq.Poller()
        poller.register(self.agent_socket, zmq.POLLIN)
        poller.register(self.control_socket, zmq.POLLIN)
        next_tick = now_ms() + TICK_MS
        next_publish = next_reclaim = next_discovery = 0
        if self.reclaimer is not None:
            for line in self.reclaimer.recover():
                self.core.counters["recovered_cgroups"] += 1
                self.events.write([{"event": "recovered", "detail": line}])
        if self.http is not None:
            self.http.start()
            log.info("http on %s:%d: /metrics, /status.json", *self.http.address[:2])
        try:
            while not self.stop_requested:
                ready = dict(poller.poll(max(0, next_tick - now_ms())))
                self._sent_in_pass = 0
                if self.agent_socket in ready:
                    self._on_agent_readable()
                if self.control_socket in ready:
                    self._on_control_readable()
                    self._sent_in_pass += 1
                if ready and not self._sent_in_pass and not self.stop_requested:
                    time.sleep(COALESCE_S)
                if now_ms() >= next_tick:
                    next_tick = now_ms() + TICK_MS
                    self._send(self.core.tick(now_ms()))
                    if self.reclaimer is not None and self.config.docker_label and now_ms() >= next_discovery:
                        next_discovery = now_ms() + DISCOVERY_MS
                        self._discover()
                    if self.reclaimer is not None and now_ms() >= next_reclaim:
                        next_reclaim = now_ms() + RECLAIM_MS
                        self._reclaim_step()
                    if now_ms() >= next_publish and (self.timeline is not None or (
                            self.http is not None and self.http.wants_snapshot(len(self.core.vms)))):
                        next_publish = now_ms() + PUBLISH_MS
                        snapshot = self.core.snapshot(now_ms())
                        sample = None
                        if self.timeline is not None:
                            sample = sample_record(snapshot)
                            self.timeline.write([sample])
                        if self.http is not None:
                            self.http.publish(snapshot, sample)
        finally:
            self.close()

    def stop(self) -> None:
        self.stop_requested = True

    def close(self) -> None:
        if self.reclaimer is not None:
            self.reclaimer.restore_all()  # never leave a guest frozen or squeezed behind
        if self.http is not None:
            self.http.close()
        events = self.core.drain_events()
        self.events.write(events)
        self.events.close()
        if self.timeline is not None:
            self.timeline.write([event_record(event) for event in events])
            self.timeline.close()
        if self._authenticator is not None:
            self._authenticator.stop()
        self.agent_socket.close(linger=0)
        self.control_socket.close(linger=0)
