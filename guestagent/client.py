"""The agent loop: one DEALER socket, a blocking zmq.Poller, the clock, and the reads of the
guest (cgroup, host meminfo, working-set sampler, the workload's report file). Everything the
agent decides is in the sans-IO `guestagent.session.AgentSession` (and `guestagent.agent`);
this module only moves frames, readings and time into it and its actions out.

Identity (protocol v3): the agent sets no routing id; hostd's ROUTER assigns one per
connection and binds the vm to the connection whose hello it welcomed. The welcome carries a
`vm_secret`; every later hello (a reconnect on a fresh socket, NOT_REGISTERED, an expired
request) presents it with `last_host_session_id`, which is how hostd tells this agent coming
back from anyone else claiming the vm (they get CONFLICT). The secret is never logged.
With CurveZMQ the host's public key is pinned: no key file, no start.

Lifecycle: hello → welcome (adopt any balloon still held: lock(adopt=True)) → follow
set_target in batches, answering nothing without the host's per-range verdict → status
every report interval (unanswered). The host counts as there while frames come from it or
our sends get through: with ZMQ_IMMEDIATE a send fails while no connection is up, and ZMTP
heartbeats (PING/PONG, answered by hostd's I/O thread) drop a connection to a host that
stopped answering. Host unreachable for host_timeout_ms → re-hello with backoff on a fresh
socket; for host_grace_ms more → deflate gradually. A lock/unlock unanswered for
2 × host_timeout_ms (a reply dropped on the way: hostd drops replies it cannot send at once)
→ re-hello on a fresh socket and re-adopt what is held, instead of waiting for it forever.
SIGTERM/SIGINT → deflate, bye, exit 0.

Speed (issue 18): inflation pins 8 batches per mlock and keeps up to 32 locks in flight;
deflation outside reclaim mode frees first and reports after; libzmq's I/O thread is
SCHED_BATCH while the balloon moves. Pressure: besides the periodic check, a cgroup v1 usage
threshold (guestagent/alarm.py) wakes the loop when the guest nears its limit, and a fast
growth of the guest's own demand is answered by giving its need back at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time

import psutil
import zmq

from guestagent import agent
from guestagent.alarm import UsageAlarm
from guestagent.balloon import MlockPinner
from guestagent.cgroup import CgroupReader
from guestagent.config import AgentConfig
from guestagent.errors import AgentError, CgroupError
from guestagent.report import STATS_KEYS
from guestagent.session import AGENT_VERSION, AgentSession
from guestagent.state import Counters, Reconnect
from guestagent.wss import WorkingSetSampler
from protocol import PAGE_SIZE_BYTES, encode
from protocol.limits import MAX_FRAME_BYTES

__all__ = ["AGENT_VERSION", "STATS_KEYS", "AgentLoop", "Counters"]

log = logging.getLogger(__name__)


def _now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def _zmq_io_threads() -> list[int]:
    """Thread ids of libzmq's I/O threads in this process (named ZMQbg/IO/n)."""
    tids = []
    with contextlib.suppress(OSError):
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/comm") as comm:
                if comm.read().startswith("ZMQbg/IO"):
                    tids.append(int(tid))
    return tids


class AgentLoop:
    def __init__(self, cfg: AgentConfig, context: zmq.Context[zmq.Socket[bytes]] | None = None) -> None:
        self.cfg = cfg
        self.reader = CgroupReader.for_path(cfg.cgroup_path) if cfg.cgroup_path else CgroupReader.detect()
        first = self.reader.read()
        memsz = cfg.memsz_bytes or first.limit_bytes
        if memsz is None:
            raise AgentError(f"cgroup {self.reader.path} has no memory limit: give the guest size with --memsz")
        self.memsz_bytes = memsz - memsz % PAGE_SIZE_BYTES
        self.pinner = MlockPinner(self.memsz_bytes // PAGE_SIZE_BYTES, want_pfn=cfg.want_pfn,
                                  huge_pages=cfg.huge_pages)
        self.session = AgentSession(cfg, self.pinner, self.memsz_bytes, self.reader.version, first)
        self.sampler = WorkingSetSampler(self.reader, self.memsz_bytes, exclude_pids={os.getpid()})
        self._curve = self._load_curve_keys(cfg)
        self.context = context or zmq.Context.instance()
        self._io_batch = False  # libzmq's I/O threads run SCHED_BATCH (while the balloon moves)
        self._io_tids: list[int] = []  # their thread ids, listed at the first switch
        self.alarm = UsageAlarm.for_cgroup(self.reader.path, self.reader.version)  # None: periodic checks only
        self.socket: zmq.Socket[bytes] | None = None
        self.stop_requested = False

    @property
    def counters(self) -> Counters:
        return self.session.counters

    @property
    def pacing(self) -> agent.PacingConfig:
        return self.session.pacing

    # ---- socket ----------------------------------------------------------------------
    @staticmethod
    def _load_curve_keys(cfg: AgentConfig) -> tuple[bytes, bytes, bytes] | None:
        """(client public, client secret, pinned server public), or None without CURVE. Read
        once at start: a missing or wrong key file stops the agent here, with its name."""
        if cfg.curve_client_key is None and cfg.curve_server_public_key is None:
            return None
        if cfg.curve_server_public_key is None or cfg.curve_client_key is None:
            raise AgentError("CurveZMQ needs both --curve-client-key and --curve-server-public-key: the agent "
                             "talks only to the host whose public key it was given (pinned)")
        from protocol.keys import KeyFileError, load_keypair

        try:
            client = load_keypair(cfg.curve_client_key)
            server = load_keypair(cfg.curve_server_public_key)
        except KeyFileError as exc:
            raise AgentError(f"CurveZMQ: {exc}; refusing to start without the keys it was configured with") from None
        if not client.secret_key:
            raise AgentError(f"CurveZMQ: {cfg.curve_client_key} has no secret key (give the agent's .key_secret file)")
        return client.public_key, client.secret_key, server.public_key

    def _open_socket(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)
        # No ZMQ_IDENTITY: hostd's ROUTER assigns the routing id, one per connection, and
        # binds the vm to the connection its hello came from.
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue hellos for a host that is not there
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        # A host that vanished without closing the connection (a cut network) is noticed by
        # its missing PONGs: the connection drops and sends start failing.
        host_timeout_ms = self.session.host_timeout_ms
        sock.setsockopt(zmq.HEARTBEAT_IVL, host_timeout_ms)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, host_timeout_ms)
        if self._curve is not None:
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = self._curve
        sock.connect(self.cfg.host_endpoint)
        self.socket = sock

    def _flush(self) -> None:
        """Carry out the session's actions in order: sends, and fresh connections."""
        for action in self.session.take_actions():
            if isinstance(action, Reconnect):
                self._open_socket()
                continue
            assert self.socket is not None
            try:
                self.socket.send(encode(action.message, action.seq), zmq.NOBLOCK)
                self.session.on_send(True, _now_ms())
            except zmq.Again:
                log.debug("host not reachable: %s not sent", action.message.kind)
                self.session.on_send(False, _now_ms())

    # ---- main loop -------------------------------------------------------------------
    def _poller(self) -> zmq.Poller:
        poller = zmq.Poller()
        assert self.socket is not None
        poller.register(self.socket, zmq.POLLIN)
        if self.alarm is not None and self.alarm.fd is not None:
            poller.register(self.alarm.fd, zmq.POLLIN)
        return poller

    def run(self) -> int:
        self._open_socket()
        self._check_guest(_now_ms())  # arms the usage alarm
        self._flush()
        poller = self._poller()
        polled = (self.socket, self.alarm.fd if self.alarm else None)
        now = _now_ms()
        self.sampler.start_period(now)
        self.session.start(now)
        log.info("agent %s: memsz %d MiB, cgroup v%d at %s, page numbers %s, host %s",
                 self.cfg.vm_id, self.memsz_bytes >> 20, self.reader.version, self.reader.path,
                 self.pinner.page_kind, self.cfg.host_endpoint)
        while not self.stop_requested:
            self._io_scheduling(self.session.moving)
            timeout = self.session.poll_timeout_ms(_now_ms())
            events = dict(poller.poll(timeout))
            if self.socket in events:
                self._drain()
            if self.alarm is not None and self.alarm.fd in events:
                self.alarm.drain()
                self.session.on_alarm()
            self._tick(_now_ms())
            if (self.socket, self.alarm.fd if self.alarm else None) != polled:
                # The socket was replaced (host lost) or the alarm re-armed (a new limit).
                poller = self._poller()
                polled = (self.socket, self.alarm.fd if self.alarm else None)
        self._shutdown()
        return 0

    def _io_scheduling(self, moving: bool) -> None:
        """libzmq's I/O thread as SCHED_BATCH while the balloon moves, SCHED_OTHER otherwise.

        Every lock sent wakes the I/O thread (an eventfd write); a woken SCHED_OTHER thread
        preempts the one that woke it, so on a busy 2-core guest each send handed the CPU away
        for ~0.3 ms: a quarter of a 1 GiB inflate (issue 18). A SCHED_BATCH thread never
        preempts on wakeup. At rest the thread is normal again, so that a new target's frame
        reaches the agent without waiting for a tick."""
        if moving == self._io_batch:
            return
        self._io_batch = moving
        policy = os.SCHED_BATCH if moving else os.SCHED_OTHER
        if not self._io_tids:
            # Listed once: the context's I/O threads live as long as it does. Listing
            # /proc/self/task took 0.4-0.7 ms, twice per movement, on the path of the
            # next target's first lock (issue 18).
            self._io_tids = _zmq_io_threads()
        for tid in self._io_tids:
            with contextlib.suppress(OSError):
                os.sched_setscheduler(tid, policy, os.sched_param(0))

    def _drain(self) -> None:
        assert self.socket is not None
        while True:
            try:
                frame = self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.session.on_frame(frame, _now_ms())
            self._flush()

    def _tick(self, now: int) -> None:
        session = self.session
        if session.due_check(now):
            self._check_guest(now)
        session.tick(now)
        # The motion step's locks and unlocks leave now, before the sampling below: reading a
        # guest process's smaps_rollup walks its page tables (~11 ms per 512 MiB here), and a
        # target that came just before a report waited for it (issue 18: first lock p99).
        self._flush()
        if session.due_ws_period(now):
            reading = session.last_reading
            session.end_ws_period(self.sampler.current(now, reading) if reading else None)
            self.sampler.start_period(now)
        if session.due_report(now):
            reading = session.last_reading
            session.report(self.sampler.current(now, reading) if reading else None, self._workload_stats())
        self._flush()

    # ---- reading the guest -----------------------------------------------------------
    def _host_swap_free_and_available(self) -> tuple[int, int]:
        """Host swap free and host memory available (containers see the host's meminfo)."""
        vm = psutil.virtual_memory()
        return psutil.swap_memory().free, vm.available

    def _check_guest(self, now: int) -> None:
        try:
            reading = self.reader.read()
        except CgroupError as exc:
            log.warning("cannot read guest statistics: %s", exc)
            return
        swap_free, available = self._host_swap_free_and_available()
        threshold = self.session.alarm_threshold_bytes(reading)
        if self.alarm is not None and threshold is not None:
            self.alarm.arm(threshold)
        self.session.on_reading(reading, swap_free, available, now)

    def _workload_stats(self) -> dict[str, int | float] | None:
        if self.cfg.workload_report is None:
            return None
        # Not written yet, or the workload is gone: its figures are then simply unknown.
        with contextlib.suppress(OSError, UnicodeDecodeError):
            return agent.workload_stats(read_workload_report(self.cfg.workload_report), time.time())
        return None

    def _shutdown(self) -> None:
        freed = self.session.shutdown()
        self._flush()
        answered = self._await_bye_answer()
        log.info("stopped: released %d pages, said bye (%s)", freed,
                 "read by the host" if answered else f"no answer within {BYE_ANSWER_WAIT_MS} ms")
        self.pinner.close()
        if self.alarm is not None:
            self.alarm.close()
        if self.socket is not None:
            self.socket.close(linger=100)

    def _await_bye_answer(self) -> bool:
        """Keep the connection until the host has read the bye (it answers with a bye):
        closing at once let libzmq discard the bye on the host's side if hostd had not read it
        yet, and the vm stayed registered until its reports were missed. Bounded: a host that
        is gone (or older) costs at most BYE_ANSWER_WAIT_MS."""
        if self.session.bye_seq is None or self.socket is None:
            return False
        deadline = _now_ms() + BYE_ANSWER_WAIT_MS
        while (left := deadline - _now_ms()) > 0 and self.socket.poll(left):
            with contextlib.suppress(zmq.Again):
                if self.session.bye_answered(self.socket.recv(zmq.NOBLOCK)):
                    return True
        return False


BYE_ANSWER_WAIT_MS = 1000  # the longest a stopping agent waits for the host to read its bye
WORKLOAD_REPORT_MAX_BYTES = 64 * 1024  # a real report is ~200 bytes


def read_workload_report(path: os.PathLike[str] | str) -> str:
    """The workload's report file, read as untrusted input: the workload writes it (and in the
    cgroup lab runs as another user), so it could be a symlink to /dev/zero, a FIFO nobody
    writes, or a huge file. Only a regular file, never followed through a final symlink,
    opened without blocking and read up to WORKLOAD_REPORT_MAX_BYTES; OSError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        data = os.read(fd, WORKLOAD_REPORT_MAX_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > WORKLOAD_REPORT_MAX_BYTES:
        raise OSError(f"{path} is larger than {WORKLOAD_REPORT_MAX_BYTES} bytes")
    return data.decode()
