"""A simulated balloon agent that speaks protocol v4 correctly: the honest peer of the attack tests.

    agent = SimAgent(endpoint, "web")          # a DEALER with no routing id of its own
    agent.hello()                              # -> Welcome (keeps vm_secret and the session id)
    agent.lock(PageRanges(((0, 64),)))         # -> LockResult (or Error); the ledger mirror follows
    agent.status()                             # balloon_pages = what the host's ledger should hold
    agent.rehello()                            # a reconnect of the same agent: presents its secret

As its own process (the honest agent of a measurement, so that the test's own work never
delays it):

    python -m tests.integration.simagent --endpoint E --vm-id web --duration 20 --out result.json

It registers, locks a base balloon, then until the duration is over: every `--period-ms` it locks
a 16-page range and unlocks it again (each a timed round trip), and every `--status-ms` it sends a
status whose balloon_pages is what it holds. On NOT_REGISTERED it says hello again with its secret
and re-adopts what it holds, as a real agent does. It prints `ready` once registered, and writes
every round trip (monotonic time, milliseconds or None for a timeout) and every error to --out.
SIGTERM ends it early (the result is still written).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from protocol import (
    Error,
    ErrorCode,
    Hello,
    Lock,
    LockResult,
    Message,
    PageRanges,
    ProtocolError,
    RangeStatus,
    SetTarget,
    Status,
    Unlock,
    UnlockResult,
    Welcome,
    decode,
    encode,
)
from protocol.limits import PAGE_SIZE_BYTES, PROTOCOL_VERSION
from protocol.messages import stats_values

MiB = 1 << 20
# What hostd's policy reads travels in typed status fields; the rest in the informational stats.
TYPED_STATUS_FIELDS: tuple[str, ...] = ("usage_bytes", "ws_samples", "ws_current_ratio")
STATS_KEYS: tuple[str, ...] = ("swap_used_bytes", "swap_in_pages", "swap_out_pages", "major_faults", "workload_ops")
REQUEST_TIMEOUT_MS = 5_000  # a lock the host never answers within this counts as a timeout (the audit's figure)


def now_ms() -> float:
    return time.monotonic() * 1000


@dataclass
class Curve:
    """CURVE client credentials: our .key_secret and the host's public .key."""

    secret_file: Path
    server_public_file: Path


@dataclass
class SimAgent:
    endpoint: str
    vm_id: str
    memsz_bytes: int = 256 * MiB
    routing_id: bytes | None = None  # only to imitate a legacy agent (or an intruder); v3 agents set none
    curve: Curve | None = None
    page_kind: str = "vpn"
    context: zmq.Context | None = None
    session_id: str | None = None
    vm_secret: str | None = None
    target_pages: int | None = None
    held: set[tuple[int, int]] = field(default_factory=set)  # ranges the host said OK to and we still hold
    unsolicited: list[Message] = field(default_factory=list)  # errors without a request, set_targets
    _seq: int = 0
    _sock: Any = None
    _own_context: bool = False

    # ---- connection ---------------------------------------------------------------------------
    def connect(self) -> SimAgent:
        if self.context is None:
            self.context, self._own_context = zmq.Context(), True
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.routing_id is not None:
            sock.setsockopt(zmq.ROUTING_ID, self.routing_id)
        if self.curve is not None:
            from protocol.keys import load_keypair

            own = load_keypair(self.curve.secret_file)
            sock.curve_publickey, sock.curve_secretkey = own.public_key, own.secret_key
            sock.curve_serverkey = load_keypair(self.curve.server_public_file).public_key
        sock.connect(self.endpoint)
        self._sock = sock
        return self

    def reconnect(self) -> None:
        """A new connection (a new ROUTER routing id), as after a network cut."""
        self._sock.close(linger=0)
        self.connect()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._own_context and self.context is not None:
            self.context.destroy(linger=0)
            self.context = None

    def __enter__(self) -> SimAgent:
        return self.connect() if self._sock is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- frames -------------------------------------------------------------------------------
    @property
    def held_pages(self) -> int:
        return sum(count for _start, count in self.held)

    def send(self, message: Message, wait_ms: int = REQUEST_TIMEOUT_MS) -> int | None:
        """Queue one frame; None when no connection took it within `wait_ms`.

        A DEALER has nowhere to queue a frame while it has no pipe: after hostd refused the
        CURVE handshake libzmq drops the pipe until the next reconnect, and on a loaded machine
        that can happen between connect() and the first send. That is the same outcome as an
        unanswered request, so it is reported as one rather than raised.
        """
        self._seq += 1
        frame = encode(message, self._seq)
        deadline = now_ms() + wait_ms
        while True:
            try:
                self._sock.send(frame, flags=zmq.NOBLOCK)
                return self._seq
            except zmq.Again:
                left = deadline - now_ms()
                if left <= 0:
                    return None
                self._sock.poll(min(50, max(1, int(left))), zmq.POLLOUT)

    def send_raw(self, frame: bytes | list[bytes]) -> None:
        if isinstance(frame, list):
            self._sock.send_multipart(frame)
        else:
            self._sock.send(frame)

    def _note(self, message: Message) -> None:
        if isinstance(message, SetTarget):
            self.target_pages = message.target_pages
        self.unsolicited.append(message)
        del self.unsolicited[:-100]

    def pump(self, timeout_ms: int = 0) -> list[Message]:
        """Read frames the host sent on its own (set_target, resets)."""
        seen = []
        while self._sock.poll(timeout_ms):
            message = decode(self._sock.recv()).message
            self._note(message)
            seen.append(message)
            timeout_ms = 0
        return seen

    def request(self, message: Message, timeout_ms: int = REQUEST_TIMEOUT_MS) -> Message | None:
        """Send and wait for the answer to this seq (None after `timeout_ms`)."""
        deadline = now_ms() + timeout_ms
        seq = self.send(message, timeout_ms)
        if seq is None:
            return None
        while (left := deadline - now_ms()) > 0:
            if not self._sock.poll(max(1, int(left))):
                break
            envelope = decode(self._sock.recv())
            reply = envelope.message
            if isinstance(reply, Error) and reply.in_reply_to == seq:
                return reply
            if isinstance(reply, Welcome | LockResult | UnlockResult) and envelope.seq == seq:
                return reply
            self._note(reply)
        return None

    # ---- the protocol -------------------------------------------------------------------------
    def hello_message(self, *, held_pages: int | None = None, session_id: str | None = None,
                      vm_secret: str | None = None, memsz_bytes: int | None = None) -> Hello:
        return Hello(vm_id=self.vm_id, memsz_bytes=memsz_bytes or self.memsz_bytes, agent_version="simagent/4",
                     page_kind=self.page_kind, supports_2m=False, cgroup_version=2, max_batch_pages=512,
                     held_pages=self.held_pages if held_pages is None else held_pages,
                     last_host_session_id=session_id, stats_keys=STATS_KEYS, vm_secret=vm_secret)

    def hello(self, timeout_ms: int = 3000, **overrides: Any) -> Message | None:
        reply = self.request(self.hello_message(**overrides), timeout_ms)
        if isinstance(reply, Welcome):
            self.session_id, self.vm_secret = reply.host_session_id, reply.vm_secret
        return reply

    def rehello(self, timeout_ms: int = 3000) -> Message | None:
        """The same agent again (after a reconnect or a reset): its secret, its session, what it holds."""
        return self.hello(timeout_ms, session_id=self.session_id, vm_secret=self.vm_secret)

    def lock(self, pages: PageRanges, adopt: bool = False, timeout_ms: int = REQUEST_TIMEOUT_MS) -> Message | None:
        reply = self.request(Lock(pages=pages, adopt=adopt), timeout_ms)
        if isinstance(reply, LockResult):
            for result in reply.results:
                if result.status == RangeStatus.OK:
                    self.held.add((result.start, result.count))
        return reply

    def lock_many(self, pages: PageRanges, adopt: bool = False) -> bool:
        """Lock in batches of the host's limit (512 pages); True when every batch was answered."""
        return all(isinstance(self.lock(chunk, adopt), LockResult) for chunk in pages.split(512))

    def unlock(self, pages: PageRanges, timeout_ms: int = REQUEST_TIMEOUT_MS) -> Message | None:
        reply = self.request(Unlock(pages=pages), timeout_ms)
        if isinstance(reply, UnlockResult):
            for result in reply.results:
                if result.status == RangeStatus.OK:
                    self.held.discard((result.start, result.count))
        return reply

    def readopt(self) -> list[Message | None]:
        """After a re-registration: report what we hold (adopt locks, ≤ 512 pages each)."""
        held = PageRanges.from_ranges(self.held)
        return [self.request(Lock(pages=chunk, adopt=True)) for chunk in held.split(512)] if held else []

    def status_body(self, *, stats: dict[str, int | float | None] | None = None, touched: float | None = 0.3,
                    state: str = "idle", balloon_pages: int | None = None) -> dict[str, Any]:
        """A status body as it goes on the wire: `stats` names typed fields (usage_bytes,
        ws_samples, ws_current_ratio) or informational stats alike, unchecked (an attack may
        send what a real agent never would)."""
        values: dict[str, int | float | None] = {
            "usage_bytes": self.memsz_bytes // 2, "swap_used_bytes": 0, "swap_in_pages": 0, "swap_out_pages": 0,
            "major_faults": 0, "ws_samples": 1, "ws_current_ratio": None, "workload_ops": 0,
        }
        values.update(stats or {})
        return {"balloon_pages": self.held_pages if balloon_pages is None else balloon_pages,
                "acked_target_seq": 0, "refused_pages": 0, "agent_state": state,
                **{name: values[name] for name in TYPED_STATUS_FIELDS},
                "ws_touched_ratio": touched, "ws_method": "referenced",
                "stats": list(stats_values(STATS_KEYS, values))}

    def status_message(self, **kwargs: Any) -> Status:
        body = self.status_body(**kwargs)
        return Status(**{**body, "stats": tuple(body["stats"])})

    def status_refused(self, **kwargs: Any) -> bool:
        """Would the protocol refuse this status (a typed field of the wrong type or out of range)?"""
        import msgpack

        try:
            decode(msgpack.packb({"v": PROTOCOL_VERSION, "kind": "status", "seq": 1,
                                  "body": self.status_body(**kwargs)}))
        except ProtocolError:
            return True
        return False

    def status(self, **kwargs: Any) -> None:
        """Send a status; one the protocol would refuse (a typed field out of range) goes out
        as raw msgpack all the same, for the host to refuse."""
        body = self.status_body(**kwargs)
        try:
            self.send(Status(**{**body, "stats": tuple(body["stats"])}))
        except ProtocolError:
            import msgpack  # only here: the protocol's codec would refuse to encode it

            self._seq += 1
            self.send_raw(msgpack.packb({"v": PROTOCOL_VERSION, "kind": "status", "seq": self._seq, "body": body}))


def error_name(reply: Message | None) -> str:
    if reply is None:
        return "timeout"
    if isinstance(reply, Error):
        return ErrorCode.label(reply.code)
    return reply.kind


# ---- the honest agent as a process -------------------------------------------------------------
class HonestRun:
    """The measuring loop of the honest agent process (see the module docstring)."""

    def __init__(self, args: argparse.Namespace) -> None:
        curve = Curve(Path(args.curve_secret), Path(args.server_key)) if args.curve_secret else None
        routing_id = args.routing_id.encode() if args.routing_id else None
        self.agent = SimAgent(args.endpoint, args.vm_id, args.memsz_mib * MiB, curve=curve,
                              routing_id=routing_id).connect()
        self.base = PageRanges(((1 << 20, args.base_pages),))  # a balloon held throughout, at VPN 1 Mi
        self.args = args
        self.stop = False
        self.rtts: list[tuple[float, str, float | None]] = []  # (monotonic ms at send, kind, rtt ms | None)
        self.errors: list[tuple[float, str]] = []
        self.registrations = 0
        self.not_registered = 0
        self.statuses = 0

    def register(self, deadline_ms: float) -> bool:
        while not self.stop and now_ms() < deadline_ms:
            reply = self.agent.rehello() if self.agent.vm_secret else self.agent.hello()
            if isinstance(reply, Welcome):
                self.registrations += 1
                if self.agent.held:
                    for answer in self.agent.readopt():
                        if not isinstance(answer, LockResult):
                            self.errors.append((now_ms(), f"readopt:{error_name(answer)}"))
                return True
            self.errors.append((now_ms(), f"hello:{error_name(reply)}"))
            time.sleep(0.2)
        return False

    def timed(self, kind: str, call: Any, pages: PageRanges) -> Message | None:
        start = now_ms()
        reply = call(pages)
        rtt = None if reply is None else now_ms() - start
        self.rtts.append((start, kind, rtt))
        if not isinstance(reply, LockResult | UnlockResult):
            self.errors.append((start, f"{kind}:{error_name(reply)}"))
            if isinstance(reply, Error) and reply.code == ErrorCode.NOT_REGISTERED:
                self.not_registered += 1
                self.register(now_ms() + 10_000)
        return reply

    def run(self) -> dict[str, Any]:
        started = now_ms()
        end = started + self.args.duration * 1000
        if not self.register(started + 10_000):
            return self.result(started, "never registered")
        if not self.agent.lock_many(self.base) or self.agent.held_pages != len(self.base):
            return self.result(started, f"base balloon refused: {self.agent.unsolicited[-3:]}")
        self.agent.status()
        print("ready", flush=True)
        next_status = now_ms() + self.args.status_ms
        cycle = 0
        while not self.stop and now_ms() < end:
            cycle += 1
            pages = PageRanges((((2 << 20) + 32 * (cycle % 1024), 16),))
            if isinstance(self.timed("lock", self.agent.lock, pages), LockResult) and (pages.ranges[0]
                                                                                       in self.agent.held):
                self.timed("unlock", self.agent.unlock, pages)
            while now_ms() >= next_status:
                self.agent.status()
                self.statuses += 1
                next_status += self.args.status_ms
            try:
                self.agent.pump(0)
            except Exception as exc:  # a frame we cannot read is the host's bug: note it, go on
                self.errors.append((now_ms(), f"pump:{exc!r}"))
            pause = min(self.args.period_ms / 1000, max(0.0, (next_status - now_ms()) / 1000))
            time.sleep(max(0.0, pause))
        return self.result(started, None)

    def result(self, started: float, failure: str | None) -> dict[str, Any]:
        resets = sum(1 for m in self.agent.unsolicited if isinstance(m, Error))
        return {"vm_id": self.args.vm_id, "started_ms": started, "ended_ms": now_ms(), "failure": failure,
                "rtts": self.rtts, "errors": self.errors, "registrations": self.registrations,
                "not_registered": self.not_registered, "unsolicited_errors": resets, "statuses": self.statuses,
                "held_pages": self.agent.held_pages}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--vm-id", required=True)
    parser.add_argument("--memsz-mib", type=int, default=256)
    parser.add_argument("--duration", type=float, required=True, help="seconds")
    parser.add_argument("--period-ms", type=float, default=100)
    parser.add_argument("--status-ms", type=float, default=250)
    parser.add_argument("--out", required=True)
    parser.add_argument("--base-pages", type=int, default=256, help="the balloon held throughout")
    parser.add_argument("--routing-id", help="imitate a legacy agent that sets ZMQ_ROUTING_ID")
    parser.add_argument("--curve-secret")
    parser.add_argument("--server-key")
    args = parser.parse_args(argv)
    run = HonestRun(args)

    def on_term(_signum: int, _frame: object) -> None:
        run.stop = True

    signal.signal(signal.SIGTERM, on_term)
    try:
        result = run.run()
    finally:
        run.agent.close()
    Path(args.out).write_text(json.dumps(result))
    return 0 if result["failure"] is None else 1


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["PAGE_SIZE_BYTES", "STATS_KEYS", "Curve", "SimAgent"]
