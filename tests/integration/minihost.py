"""A minimal real host for agent tests: a ROUTER on loopback that welcomes agents, accepts
every lock, and lets the test push targets and wait for statuses. Driven synchronously from
the test (pump until a condition holds, with a deadline): no threads, no sleeps.

Identity as hostd has it since protocol v3: the ROUTER assigns routing ids (no handover);
a welcome binds the vm to the connection (routing id) its hello came from and carries a
fresh `vm_secret`; a hello for a registered vm (on another connection or its own) is welcomed
only with that secret and the current session id (the same agent reconnecting keeps its
ledger), anything else gets CONFLICT. Replies go to the routing id the request came from. `ledger`,
`target_pages` stay keyed by the vm id (as bytes). Test knobs: `refuse_locks`,
`drop_replies` (lock/unlock replies to drop, like hostd's EAGAIN drop), `forget()` (the vm's
connection no longer registered: NOT_REGISTERED) and `reopen()` (every connection drops,
the host's state stays). The welcome's typed settings (protocol v4) are the test's:
`sample_period_ms` (None by default: the agent keeps its own period) and `reclaim`;
`push_settings(sample_period_ms)` sends a `settings` message to every registered connection,
as hostd does when `balloonctl host sample_period=...` changes it.

Kept honest by tests/contract/test_host_contract.py, which runs the same conversations over
this and hostd.core.HostCore through `handle_agent(route, frame)` (the same signature as
HostCore's; `pump` is only the socket around it). What it shares with hostd: the welcome's
host timeout ((lost_after_reports + 2) × report interval), per-vm target seqs in lock/unlock
replies, lock ranges REFUSED past the balloon's cap (max(ctl_max_percent of memsz, target);
memsz when adopting), unlocks of pages not held UNKNOWN, the batch limit (LIMIT_EXCEEDED),
MALFORMED / UNEXPECTED_KIND / INVALID_FIELD errors. What it does not do (the contract suite
records each): a policy (targets come only from the test), the settle window, the join rate
and admission limits, the ledger's range limit."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

import zmq

from protocol import (
    Bye,
    Envelope,
    Error,
    ErrorCode,
    Hello,
    Lock,
    LockResult,
    Message,
    ProtocolError,
    RangeResult,
    RangeStatus,
    SetTarget,
    Settings,
    Status,
    Unlock,
    UnlockResult,
    Welcome,
    decode,
    encode,
    stats_map,
)


class MiniHost:
    def __init__(self, context: zmq.Context, session_id: str = "mini-1", report_interval_ms: int = 200,
                 port: int | None = None, curve_secret_key: bytes | None = None,
                 host_timeout_ms: int | None = None, sample_period_ms: int | None = None, reclaim: bool = False,
                 lost_after_reports: int = 3, batch_limit_pages: int = 512, ctl_max_percent: int = 65) -> None:
        self.context = context
        self._curve_secret_key = curve_secret_key
        self._bind(port)
        self.session_id = session_id
        self.report_interval_ms = report_interval_ms
        # hostd's: the agent gives up on a host a little after the host gives up on it.
        self.host_timeout_ms = ((lost_after_reports + 2) * report_interval_ms if host_timeout_ms is None
                                else host_timeout_ms)
        self.batch_limit_pages = batch_limit_pages
        self.ctl_max_percent = ctl_max_percent
        self.sample_period_ms = sample_period_ms
        self.reclaim = reclaim
        self.hellos: list[Hello] = []
        self.welcomes: list[Welcome] = []
        self.statuses: list[Status] = []
        self.ledger: dict[bytes, set[int]] = {}  # vm id → pages
        self.routes: dict[bytes, str] = {}  # routing id (the ROUTER's, one per connection) → vm id
        self.vm_routes: dict[str, bytes] = {}  # vm id → the connection its welcome bound
        self.vm_secrets: dict[str, str] = {}
        self.conflicts = 0
        self.lock_frames = 0
        self.unlock_frames = 0
        self.dropped_replies = 0
        self.byes: list[Bye] = []
        self.target_pages: dict[bytes, int] = {}
        self.vm_target_seq: dict[bytes, int] = {}  # vm id → the seq of the last target it was sent
        self.memsz_pages: dict[bytes, int] = {}
        self.vm_hellos: dict[str, Hello] = {}  # vm id → the hello its registration welcomed
        self.target_seq = 0  # the host's counter, shared by all vms (as hostd's)
        self.target_sent_at: dict[int, float] = {}
        self.refuse_locks = False
        self.drop_replies = 0  # drop this many more lock/unlock replies
        self._seq = 0
        self._outbox: list[tuple[bytes, bytes]] = []

    def _bind(self, port: int | None) -> None:
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if self._curve_secret_key is not None:
            self.socket.curve_server = True
            self.socket.curve_secretkey = self._curve_secret_key
        if port is None:
            self.port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        else:
            # A restarted host rebinds its old port; libzmq releases a closed socket's port
            # asynchronously, so wait (bounded) for our own previous socket to let go.
            deadline = time.monotonic() + 5
            while True:
                try:
                    self.socket.bind(f"tcp://127.0.0.1:{port}")
                    break
                except zmq.ZMQError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            self.port = port
        self.endpoint = f"tcp://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.socket.close(linger=0)

    def reopen(self) -> None:
        """Every agent connection drops (the socket closes and binds the same port again);
        registrations, secrets and ledgers stay: a vm stays bound to its old, dead connection,
        so only the agent that holds its secret gets it back (hostd: until it marks it lost)."""
        self.socket.close(linger=0)
        self._bind(self.port)

    def forget(self, vm_id: str) -> None:
        """The vm's connection is no longer registered (hostd marked it lost): its next frame
        gets NOT_REGISTERED and a plain hello registers it again."""
        route = self.vm_routes.pop(vm_id, None)
        if route is not None:
            self.routes.pop(route, None)

    def _send(self, identity: bytes, message: Message, seq: int | None = None) -> None:
        if seq is None:
            self._seq += 1
            seq = self._seq
        self._outbox.append((identity, encode(message, seq)))

    def _flush(self) -> list[tuple[bytes, bytes]]:
        out, self._outbox = self._outbox, []
        return out

    def _transmit(self, out: list[tuple[bytes, bytes]]) -> None:
        for identity, frame in out:
            self.socket.send_multipart([identity, frame])

    def set_target(self, vm_id: str, target_pages: int, target_seq: int | None = None) -> None:
        """Send a target to the vm's connection (kept for its next hello if it has none).
        `target_seq` overrides the host's counter (a spoofed jump), without moving it."""
        self._transmit(self.target_frames(vm_id, target_pages, target_seq))

    def target_frames(self, vm_id: str, target_pages: int, target_seq: int | None = None) -> list[tuple[bytes, bytes]]:
        """`set_target` without the socket: the (routing id, frame) pairs it sends."""
        self.target_seq += target_seq is None
        seq = self.target_seq if target_seq is None else target_seq
        if target_seq is None:
            self.target_pages[vm_id.encode()] = target_pages
            self.vm_target_seq[vm_id.encode()] = seq
        self.target_sent_at[seq] = time.perf_counter()
        route = self.vm_routes.get(vm_id)
        if route is not None:
            self._send(route, SetTarget(target_pages=target_pages, target_seq=seq))
        return self._flush()

    def push_settings(self, sample_period_ms: int) -> None:
        """A host setting changed: every registered connection is sent the new settings."""
        self._transmit(self.settings_frames(sample_period_ms))

    def settings_frames(self, sample_period_ms: int) -> list[tuple[bytes, bytes]]:
        """`push_settings` without the socket: the (routing id, frame) pairs it sends."""
        self.sample_period_ms = sample_period_ms
        for route in self.vm_routes.values():
            self._send(route, Settings(sample_period_ms=sample_period_ms))
        return self._flush()

    def _hello(self, route: bytes, seq: int, hello: Hello) -> None:
        self.hellos.append(hello)
        vm_id = hello.vm_id
        bound = self.routes.get(route)
        held_by = self.vm_routes.get(vm_id)
        proven = (held_by is not None and hello.vm_secret is not None
                  and hello.last_host_session_id == self.session_id and hello.vm_secret == self.vm_secrets.get(vm_id))
        # Like hostd: a live registration is taken over only with its secret, even on its own connection.
        if (bound is not None and bound != vm_id) or (held_by is not None and not proven):
            self.conflicts += 1
            self._send(route, Error(code=int(ErrorCode.CONFLICT), detail=f"vm {vm_id} is registered elsewhere",
                                    in_reply_to=seq), seq)
            return
        identity = vm_id.encode()
        if not proven:
            # Like hostd: a new registration starts the ledger anew (adopt locks refill it) and
            # gets a new secret; the same agent coming back keeps both.
            self.ledger[identity] = set()
            self.vm_secrets[vm_id] = secrets.token_urlsafe(24)
        if held_by is not None:
            self.routes.pop(held_by, None)
        self.routes[route] = vm_id
        self.vm_routes[vm_id] = route
        # Adopt what the agent still holds: its balloon stays until a target says otherwise.
        self.target_pages.setdefault(identity, hello.held_pages)
        self.memsz_pages[identity] = hello.memsz_bytes // 4096
        self.vm_hellos[vm_id] = hello
        welcome = Welcome(host_session_id=self.session_id, report_interval_ms=self.report_interval_ms,
                          host_timeout_ms=self.host_timeout_ms, batch_limit_pages=self.batch_limit_pages,
                          sample_period_ms=self.sample_period_ms, reclaim=self.reclaim,
                          vm_secret=self.vm_secrets[vm_id])
        self.welcomes.append(welcome)
        self._send(route, welcome, seq)
        if self.vm_target_seq.get(identity):
            # The vm's last target again (hostd: at its next recompute, ≤ 100 ms later, with a
            # new seq; the agent takes either).
            self._send(route, SetTarget(target_pages=self.target_pages[identity],
                                        target_seq=self.vm_target_seq[identity]))

    def _reply(self, route: bytes, message: Message, seq: int) -> None:
        if self.drop_replies > 0:
            self.drop_replies -= 1
            self.dropped_replies += 1
            return
        self._send(route, message, seq)

    def _error(self, route: bytes, code: ErrorCode, detail: str, seq: int | None) -> None:
        self._send(route, Error(code=int(code), detail=detail, in_reply_to=seq), seq)

    def handle_agent(self, route: bytes, frame: bytes) -> list[tuple[bytes, bytes]]:
        """One frame from an agent's connection → the (routing id, frame) pairs to send, as
        hostd.core.HostCore.handle_agent answers (errors as Error frames, never raised)."""
        try:
            envelope: Envelope = decode(frame)
        except ProtocolError as exc:
            self._error(route, exc.code, exc.detail, None)
            return self._flush()
        try:
            self.handle(route, envelope.seq, envelope.message)
        except ProtocolError as exc:
            self._error(route, exc.code, exc.detail, envelope.seq)
        return self._flush()

    def _lock_status(self, identity: bytes, held: set[int], start: int, count: int, adopt: bool) -> RangeStatus:
        new = set(range(start, start + count))
        if self.refuse_locks:
            return RangeStatus.REFUSED
        if new & held:
            return RangeStatus.OK if adopt and new <= held else RangeStatus.DUPLICATE
        memsz = self.memsz_pages.get(identity, 0)
        cap = memsz if adopt else max(memsz * self.ctl_max_percent // 100, self.target_pages.get(identity, 0))
        if len(held) + count > cap:
            return RangeStatus.REFUSED
        held |= new
        return RangeStatus.OK

    def handle(self, route: bytes, seq: int, message: Message) -> None:
        if message.plane != "agent" or isinstance(message, Welcome | Settings | SetTarget | LockResult | UnlockResult):
            raise ProtocolError(ErrorCode.UNEXPECTED_KIND, f"{message.kind} is not sent by agents")
        if isinstance(message, Hello):
            self._hello(route, seq, message)
            return
        vm_id = self.routes.get(route)
        if vm_id is None:
            self._error(route, ErrorCode.NOT_REGISTERED, "say hello first", seq)
            return
        identity = vm_id.encode()
        target = self.target_pages.get(identity, 0)
        target_seq = self.vm_target_seq.get(identity, 0)
        if isinstance(message, Lock | Unlock) and message.pages.page_count > self.batch_limit_pages:
            raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, f"{message.kind} of {message.pages.page_count} pages: "
                                f"the batch limit is {self.batch_limit_pages} pages")
        if isinstance(message, Lock):
            self.lock_frames += 1
            held = self.ledger.setdefault(identity, set())
            results = tuple(RangeResult(start=s, count=c, status=self._lock_status(identity, held, s, c, message.adopt))
                            for s, c in message.pages.ranges)
            self._reply(route, LockResult(results=results, target_pages=target, target_seq=target_seq), seq)
        elif isinstance(message, Unlock):
            self.unlock_frames += 1
            held = self.ledger.setdefault(identity, set())
            unlocked = []
            for start, count in message.pages.ranges:
                pages = set(range(start, start + count))
                status = RangeStatus.OK if pages <= held else RangeStatus.UNKNOWN
                held -= pages
                unlocked.append(RangeResult(start=start, count=count, status=status))
            self._reply(route, UnlockResult(results=tuple(unlocked), target_pages=target, target_seq=target_seq),
                        seq)
        elif isinstance(message, Status):
            hello = self.vm_hellos.get(vm_id)  # not a refused claim's hello
            if hello is not None and len(message.stats) != len(hello.stats_keys):
                raise ProtocolError(ErrorCode.INVALID_FIELD, f"status.stats has {len(message.stats)} values; the "
                                    f"hello named {len(hello.stats_keys)}")
            self.statuses.append(message)  # unanswered, as hostd does
        elif isinstance(message, Bye):
            self.byes.append(message)
            self.ledger.pop(identity, None)
            self.forget(vm_id)
            self._reply(route, Bye(reason="dropped"), seq)  # as hostd: the bye was read

    def pump(self, until: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition",
             poll_ms: int = 100) -> None:
        """Handle frames until `until()` holds (checked at least every `poll_ms`)."""
        deadline = time.monotonic() + timeout_s
        while not until():
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                last = self.statuses[-1] if self.statuses else None
                raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last status: {last}")
            if self.socket.poll(min(remaining_ms, poll_ms)):
                route, frame = self.socket.recv_multipart()
                self._transmit(self.handle_agent(route, frame))

    def last_status(self) -> Status | None:
        return self.statuses[-1] if self.statuses else None

    def stat(self, name: str) -> int | float | None:
        """A value of the last status's stats, by the name the last hello gave it."""
        status = self.last_status()
        assert status is not None and self.hellos
        return stats_map(self.hellos[-1].stats_keys, status.stats)[name]
