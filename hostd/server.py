"""hostd's I/O: two ROUTER sockets, the clock and the event log, around `HostCore`.

One thread: a zmq.Poller loop over the agent and control ROUTERs that also runs the core's
tick (liveness, balance period) every 100 ms. Each wakeup handles a bounded batch of queued
frames per socket and answers them without blocking, so neither plane can starve the other
or the tick. The core is synchronous, never touches a socket and answers every frame (a
failure becomes an INTERNAL error reply); a failing periodic step is logged and retried.

Authentication (hostd/auth.py) is in place before any socket binds: the ZAP handler for
CURVE, the control token file, and the ipc:// control socket's file mode.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import resource
import secrets
import time
from pathlib import Path
from typing import Any

import zmq

from hostd.auth import AGENT_DOMAIN, CONTROL_DOMAIN, ControlTokenError, CurveGate, enforce_zap, ensure_control_token
from hostd.cgroupfs import BackendError, CgroupfsBackend
from hostd.config import HostConfig, parse_http_address
from hostd.core import HostCore, Outgoing
from hostd.eventlog import EventLog, TimelineFile, printable
from hostd.heap_trim import HeapTrimSchedule, connection_churn, trim_heap
from hostd.reclaim import HostReclaimer
from hostd.statefile import load_settings, write_private_json
from hostd.timeline import event_record, sample_record
from protocol.limits import MAX_CONTROL_REQUEST_BYTES, MAX_FRAME_BYTES

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
AGENT_FRAMES_PER_PASS = 512  # then the control socket and the tick get their turn
PASS_BUDGET_S = 0.020  # nor longer than this per socket: an expensive frame cannot hold the others off
CONTROL_FRAMES_PER_PASS = 32
CONTROL_CHECK_FRAMES = 32  # within an agent pass, a waiting control request is served every this many frames
CONTROL_SNDHWM = 64  # replies queued for one control client; a client that never reads loses them
KEYS_RELOAD_MS = 1_000  # allowlists re-read this often (a removed key stops working within it)
# Pending TCP connections the agent port queues: libzmq's default, on purpose. 4096 was tried
# (review S11: 1,000 one-shot connections at once overflowed 100 ~29,000 times a run into 1 s SYN
# retries), and it did answer more hellos in time, but hostd then held every connection at once:
# RSS +225..+278 MiB instead of +58, status p99 676-800 ms instead of 360-408, and the honest
# agent's frames queued behind them until it was lost (S11 test, load 2-5.5, 2 runs each).
AGENT_BACKLOG = 100


def now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def raise_fd_limit() -> None:
    """Every agent is a TCP connection (a file descriptor): allow as many as the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def host_max_pfn(zoneinfo: Path = Path("/proc/zoneinfo")) -> int | None:
    """One past the highest page frame of any memory zone (None if it cannot be read): each
    zone block ("Node N, zone X") has `spanned` pages from `start_pfn`."""
    highest = 0
    zones: list[dict[str, int]] = []
    try:
        for line in zoneinfo.read_text().splitlines():
            words = line.replace(":", " ").split()
            if line.startswith("Node "):
                zones.append({})
            elif zones and len(words) == 2 and words[0] in ("spanned", "start_pfn"):
                zones[-1][words[0]] = int(words[1])
    except (OSError, ValueError):
        return None
    for zone in zones:
        if "spanned" in zone and "start_pfn" in zone:
            highest = max(highest, zone["start_pfn"] + zone["spanned"])
    return highest or None


class HostServer:
    def __init__(self, config: HostConfig, context: zmq.Context[zmq.Socket[bytes]] | None = None) -> None:
        self.config = config
        self.session_id = f"h-{secrets.token_hex(4)}"
        self.control_is_ipc = config.control_endpoint.startswith("ipc://")
        control_token: str | None = None
        try:
            control_token = ensure_control_token(config.control_token_file)
        except (OSError, ControlTokenError) as exc:
            log.error("no control token (%s): balloonctl changes need %s", exc,
                      "the ipc:// control socket" if self.control_is_ipc else
                      "an operator key (control_allowlist) or the ipc:// control socket")
        self.core = HostCore(config, self.session_id, now_ms(), control_token, max_pfn=host_max_pfn())
        for line in self.core.restore_settings(load_settings(config.settings_file), now_ms()):
            log.warning("saved setting skipped: %s", line)
        self.context = context or zmq.Context()
        # CURVE's ZAP handler before any bind: no handshake is ever accepted without it.
        self.gate: CurveGate | None = None
        if config.curve_allowlist is not None:
            self.gate = CurveGate(self.context, config.curve_allowlist, config.control_allowlist)
            self.core.agent_vm_ids = self.gate.agent_vm_ids()
        self.events = EventLog(config.event_log, self.session_id)
        self.timeline = TimelineFile(config.timeline) if config.timeline is not None else None
        self.stop_requested = False
        self._sent_in_pass = 0
        self._agent_behind_since: int | None = None  # agent frames queued unread since (None: caught up)
        self._read_errors: dict[str, str] = {}  # vm → the last reason its cgroup could not be read
        self.heap_trim = HeapTrimSchedule()
        self.agent_socket = self._router(config.agent_endpoint, AGENT_DOMAIN if self.gate else None,
                                         max_frame_bytes=MAX_FRAME_BYTES, backlog=AGENT_BACKLOG)
        self.control_socket = self._router(
            config.control_endpoint, CONTROL_DOMAIN if self.gate and config.control_allowlist else None,
            max_frame_bytes=MAX_CONTROL_REQUEST_BYTES, sndhwm=CONTROL_SNDHWM)
        # A connection to the control socket is an operator when CURVE let only operators in,
        # or when the ipc:// socket's file mode let only its owner (and group) in.
        self.control_operator = config.control_allowlist is not None or self.control_is_ipc
        if self.control_is_ipc:
            self._secure_ipc(config.control_endpoint.removeprefix("ipc://"))
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

    def _secure_ipc(self, path: str) -> None:
        os.chmod(path, self.config.control_socket_mode)
        if self.config.control_socket_group:
            os.chown(path, -1, grp.getgrnam(self.config.control_socket_group).gr_gid)

    def _router(self, endpoint: str, curve_domain: str | None, max_frame_bytes: int,
                sndhwm: int = 10_000, backlog: int = 100) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished peer raises, never silently drops
        # No ROUTER_HANDOVER: a second connection that presents a live peer's routing id is
        # refused by libzmq instead of taking the pipe over (hostd binds vms to connections,
        # and a handover silently cut the live agent off).
        sock.setsockopt(zmq.SNDHWM, sndhwm)
        sock.setsockopt(zmq.BACKLOG, backlog)
        if curve_domain is not None and self.config.curve_secret_key is not None:
            from protocol.keys import load_keypair

            pair = load_keypair(self.config.curve_secret_key)
            if pair.secret_key is None:
                raise ValueError(f"{self.config.curve_secret_key} holds no secret key")
            sock.curve_secretkey = pair.secret_key
            sock.curve_publickey = pair.public_key
            sock.curve_server = True
            enforce_zap(sock, curve_domain)
        sock.bind(endpoint)
        return sock

    def _send(self, out: Outgoing, replies: bool = False) -> None:
        """`replies`: `out` answers agent frames (a welcome among them): one that cannot be sent
        means its connection closed before hostd answered (HostCore.route_gone)."""
        self._sent_in_pass += len(out)
        for identity, frame in out:
            try:
                self.agent_socket.send_multipart([identity, frame], flags=zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # EHOSTUNREACH (peer gone) or EAGAIN (peer not reading)
                self.core.counters[f"send_failed_{exc.errno}"] += 1
                if replies and exc.errno == zmq.EHOSTUNREACH:
                    self.core.route_gone(identity, now_ms())
        events = self.core.drain_events()
        if events:
            self.events.write(events)
            if self.timeline is not None:
                self.timeline.write([event_record(event) for event in events])
            if self.http is not None:
                self.http.publish_events(events)

    def _on_agent_readable(self) -> bool:
        """One bounded batch; True if frames are left for the next pass."""
        curve = self.gate is not None
        deadline = time.monotonic() + PASS_BUDGET_S
        for index in range(AGENT_FRAMES_PER_PASS):
            if time.monotonic() >= deadline:
                return True
            if index % CONTROL_CHECK_FRAMES == CONTROL_CHECK_FRAMES - 1 and self._control_waiting():
                self._on_control_readable()  # balloonctl is served between batches, not after the pass
            user_id: str | None = None
            try:
                if curve:  # the ZAP User-Id travels with every frame of the connection
                    frames = self.agent_socket.recv_multipart(zmq.NOBLOCK, copy=False)
                    parts = [frame.bytes for frame in frames]
                    found = frames[-1].get("User-Id")
                    user_id = found if isinstance(found, str) and found else None
                else:
                    parts = self.agent_socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return False
            # A multipart frame is malformed: the core counts it once, from the empty body.
            body = parts[1] if len(parts) == 2 else b""
            self._send(self.core.handle_agent(parts[0], body, now_ms(), user_id), replies=True)
        return True

    def _reading_behind_ms(self) -> int:
        return 0 if self._agent_behind_since is None else now_ms() - self._agent_behind_since

    def _control_waiting(self) -> bool:
        return bool(int(self.control_socket.get(zmq.EVENTS)) & zmq.POLLIN)

    def _on_control_readable(self) -> bool:
        for _ in range(CONTROL_FRAMES_PER_PASS):
            try:
                parts = self.control_socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return False
            reply, out = self.core.handle_control(parts[-1] if len(parts) == 2 else b"", now_ms(),
                                                  self.control_operator)
            try:
                self.control_socket.send_multipart([parts[0], reply], flags=zmq.NOBLOCK)
            except zmq.ZMQError:  # a client that does not read: its reply is dropped, not queued
                self.core.counters["control_reply_failed"] += 1
            self._send(out)
            self._save_settings()
        return True

    def _save_settings(self) -> None:
        if not self.core.settings_dirty or self.config.settings_file is None:
            return
        self.core.settings_dirty = False
        try:
            write_private_json(self.config.settings_file, self.core.settings_document())
        except (OSError, ValueError) as exc:
            self.core.counters["settings_write_failed"] += 1
            log.error("balloonctl's changes are in force but not saved to %s: %s", self.config.settings_file, exc)

    def _reload_keys(self) -> None:
        if self.gate is not None and self.gate.reload_if_changed():
            self.core.set_agent_keys(self.gate.agent_vm_ids(), now_ms())

    def _periodic(self, name: str, step: Any) -> None:
        """A periodic step that fails is logged (once per new reason) and tried again next time."""
        try:
            step()
        except Exception as exc:
            self.core.counters[f"{name}_failed"] += 1
            if self._read_errors.get(f"*{name}*") != repr(exc):
                self._read_errors[f"*{name}*"] = repr(exc)
                log.exception("%s failed; hostd goes on", name)

    def _trim_heap(self, churn: int) -> None:
        trim_heap()
        self.heap_trim.trimmed(now_ms(), churn)
        self.core.counters["heap_trims"] += 1

    def _discover(self) -> None:
        """Containers labelled for a vm join the host targets (the config's own entries win)."""
        assert self.reclaimer is not None
        try:
            found = self.reclaimer.discover(self.config.docker_label, self.config.docker_label_filter)
        except BackendError as exc:
            if self._read_errors.get("*discovery*") != str(exc):
                log.warning("docker discovery: %s", printable(str(exc)))
                self._read_errors["*discovery*"] = str(exc)
            return
        self._read_errors.pop("*discovery*", None)
        for vm_id, target in found.items():
            if vm_id not in self.config.host_targets and self.reclaimer.targets.get(vm_id) != target:
                log.info("vm %s is container %s", vm_id, printable(target.removeprefix("docker:")))
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
                    log.warning("vm %s: cannot read %s: %s", vm_id, printable(self.reclaimer.targets[vm_id]),
                                printable(str(exc)))
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
        log.info("hostd session %s: agents on %s, control on %s, host memory %d MiB, τ=%g, balance every %d ms",
                 self.session_id, self.config.agent_endpoint, self.config.control_endpoint,
                 self.core.settings.host_memory_pages >> 8, self.core.settings.idle_tax_ratio,
                 self.core.settings.balance_period_ms)
        poller = zmq.Poller()
        poller.register(self.agent_socket, zmq.POLLIN)
        poller.register(self.control_socket, zmq.POLLIN)
        next_tick = now_ms() + TICK_MS
        next_publish = next_reclaim = next_discovery = next_keys = 0
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
                backlog = False  # a batch was cut short: poll again at once, no coalescing
                if self.agent_socket in ready:
                    agent_backlog = self._on_agent_readable()
                    backlog |= agent_backlog
                    if not agent_backlog:
                        self._agent_behind_since = None
                    elif self._agent_behind_since is None:
                        self._agent_behind_since = now_ms()
                if self.control_socket in ready or (ready and self._control_waiting()):
                    backlog |= self._on_control_readable()
                    self._sent_in_pass += 1
                if ready and not self._sent_in_pass and not backlog and not self.stop_requested:
                    time.sleep(COALESCE_S)
                if now_ms() >= next_tick:  # on its deadline, whatever the sockets bring
                    next_tick = now_ms() + TICK_MS
                    self._periodic("tick", lambda: self._send(self.core.tick(now_ms(), self._reading_behind_ms())))
                    churn = connection_churn(self.core.protocol_errors, self.core.counters)
                    if self.heap_trim.due(now_ms(), churn):
                        self._periodic("heap_trim", lambda churn=churn: self._trim_heap(churn))
                    if now_ms() >= next_keys:
                        next_keys = now_ms() + KEYS_RELOAD_MS
                        self._periodic("keys", self._reload_keys)
                    if self.reclaimer is not None and self.config.docker_label and now_ms() >= next_discovery:
                        next_discovery = now_ms() + DISCOVERY_MS
                        self._periodic("discovery", self._discover)
                    if self.reclaimer is not None and now_ms() >= next_reclaim:
                        next_reclaim = now_ms() + RECLAIM_MS
                        self._periodic("reclaim", self._reclaim_step)
                    if now_ms() >= next_publish and (self.timeline is not None or (
                            self.http is not None and self.http.wants_snapshot(len(self.core.vms)))):
                        next_publish = now_ms() + PUBLISH_MS
                        self._periodic("publish", self._publish)
        finally:
            self.close()

    def _publish(self) -> None:
        snapshot = self.core.snapshot(now_ms())
        sample = None
        if self.timeline is not None:
            sample = sample_record(snapshot)
            self.timeline.write([sample])
        if self.http is not None:
            self.http.publish(snapshot, sample)

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
        self.agent_socket.close(linger=0)
        self.control_socket.close(linger=0)
        if self.gate is not None:
            self.gate.stop()
        if self.control_is_ipc:
            with contextlib.suppress(OSError):
                os.unlink(self.config.control_endpoint.removeprefix("ipc://"))
