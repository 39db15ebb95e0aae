"""A minimal real host for agent tests: a ROUTER on loopback that welcomes agents, accepts
every lock, and lets the test push targets and wait for statuses. Driven synchronously from
the test (pump until a condition holds, with a deadline): no threads, no sleeps."""

from __future__ import annotations

import time
from collections.abc import Callable

import zmq

from protocol import (
    Bye,
    Error,
    ErrorCode,
    Hello,
    Lock,
    LockResult,
    Message,
    RangeResult,
    RangeStatus,
    SetTarget,
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
                 port: int | None = None, curve_secret_key: bytes | None = None) -> None:
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve_secret_key is not None:
            self.socket.curve_server = True
            self.socket.curve_secretkey = curve_secret_key
        self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
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
        self.session_id = session_id
        self.report_interval_ms = report_interval_ms
        self.hellos: list[Hello] = []
        self.statuses: list[Status] = []
        self.ledger: dict[bytes, set[int]] = {}
        self.lock_frames = 0
        self.byes: list[Bye] = []
        self.target_pages: dict[bytes, int] = {}
        self.target_seq = 0
        self.target_sent_at: dict[int, float] = {}
        self.refuse_locks = False
        self._seq = 0

    def close(self) -> None:
        self.socket.close(linger=0)

    def _send(self, identity: bytes, message: Message, seq: int | None = None) -> None:
        if seq is None:
            self._seq += 1
            seq = self._seq
        self.socket.send_multipart([identity, encode(message, seq)])

    def set_target(self, vm_id: str, target_pages: int) -> None:
        identity = vm_id.encode()
        self.target_seq += 1
        self.target_pages[identity] = target_pages
        self.target_sent_at[self.target_seq] = time.perf_counter()
        self._send(identity, SetTarget(target_pages=target_pages, target_seq=self.target_seq))

    def _results(self, message: Lock | Unlock, status: RangeStatus) -> tuple[RangeResult, ...]:
        return tuple(RangeResult(start=s, count=c, status=status) for s, c in message.pages.ranges)

    def handle(self, identity: bytes, seq: int, message: Message) -> None:
        target = self.target_pages.get(identity, 0)
        if not isinstance(message, Hello) and identity not in self.ledger:
            self._send(identity, Error(code=int(ErrorCode.NOT_REGISTERED), detail="say hello first",
                                       in_reply_to=seq), seq)
            return
        if isinstance(message, Hello):
            self.hellos.append(message)
            self.ledger[identity] = set()  # like hostd: a hello starts the ledger anew; adopt locks refill it
            # Adopt what the agent still holds: its balloon stays until a target says otherwise.
            self.target_pages.setdefault(identity, message.held_pages)
            self._send(identity, Welcome(host_session_id=self.session_id, report_interval_ms=self.report_interval_ms,
                                         host_timeout_ms=5 * self.report_interval_ms, batch_limit_pages=512,
                                         settings={}), seq)
            if self.target_seq:
                self._send(identity, SetTarget(target_pages=target, target_seq=self.target_seq))
        elif isinstance(message, Lock):
            self.lock_frames += 1
            pages = self.ledger.setdefault(identity, set())
            new = set(message.pages.iter_pages())
            if self.refuse_locks:
                status = RangeStatus.REFUSED
            elif new & pages and not message.adopt:
                status = RangeStatus.DUPLICATE
            else:
                status = RangeStatus.OK
                pages |= new
            self._send(identity, LockResult(results=self._results(message, status), target_pages=target,
                                            target_seq=self.target_seq), seq)
        elif isinstance(message, Unlock):
            self.ledger.setdefault(identity, set()).difference_update(message.pages.iter_pages())
            self._send(identity, UnlockResult(results=self._results(message, RangeStatus.OK), target_pages=target,
                                              target_seq=self.target_seq), seq)
        elif isinstance(message, Status):
            self.statuses.append(message)  # unanswered, as hostd does
        elif isinstance(message, Bye):
            self.byes.append(message)
            self.ledger.pop(identity, None)

    def pump(self, until: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout_s
        while not until():
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                last = self.statuses[-1] if self.statuses else None
                raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last status: {last}")
            if self.socket.poll(min(remaining_ms, 100)):
                identity, frame = self.socket.recv_multipart()
                envelope = decode(frame)
                self.handle(identity, envelope.seq, envelope.message)

    def last_status(self) -> Status | None:
        return self.statuses[-1] if self.statuses else None

    def stat(self, name: str) -> int | float | None:
        """A value of the last status's stats, by the name the last hello gave it."""
        status = self.last_status()
        assert status is not None and self.hellos
        return stats_map(self.hellos[-1].stats_keys, status.stats)[name]
