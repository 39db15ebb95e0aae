"""Attackers of the audit's Phase 2 (review-security.md), each run as its own process and bounded.

    python -m tests.integration.attackers flood --endpoint E --frames 50000 --seed 1
    python -m tests.integration.attackers oversize --endpoint E --frames 60
    python -m tests.integration.attackers varint-bomb --endpoint E --frames 150
    python -m tests.integration.attackers range-bomb --endpoint E --vm-id rb --frames 400
    python -m tests.integration.attackers pfn-squat --endpoint E --vms 1000 --frames 100
    python -m tests.integration.attackers identities --endpoint E --count 5000 --prefix p0
    python -m tests.integration.attackers status-flood --endpoint E --vms 4 --seconds 10

Each stops by itself (frame count, and --max-seconds whatever happens) and prints one JSON line
with what it did (frames sent, seconds, answers seen) as its last line on stdout.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from typing import Any

import msgpack
import zmq

from protocol import (
    Bye,
    Error,
    ErrorCode,
    GetStatus,
    Heartbeat,
    Hello,
    Lock,
    PageRanges,
    Status,
    Unlock,
    Welcome,
    decode,
    encode,
)
from protocol.limits import MAX_FRAME_BYTES, PROTOCOL_VERSION
from protocol.messages import KINDS
from tests.integration.simagent import STATS_KEYS, SimAgent

MiB = 1 << 20
KINDS_NAMES = sorted(KINDS)


def _context() -> zmq.Context:
    context = zmq.Context()
    context.set(zmq.MAX_SOCKETS, 30_000)
    return context


def _dealer(context: zmq.Context, endpoint: str, sndhwm: int = 1000) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.SNDHWM, sndhwm)
    sock.setsockopt(zmq.RCVHWM, 100)  # replies are not read: let them back up into hostd's queue
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def _code_name(message: Any) -> str:
    if isinstance(message, Error):
        return ErrorCode.label(message.code)
    return message.kind


def _hello(vm_id: str, memsz: int = 64 * MiB, page_kind: str = "vpn") -> Hello:
    return Hello(vm_id=vm_id, memsz_bytes=memsz, agent_version="attacker", page_kind=page_kind, supports_2m=False,
                 cgroup_version=2, max_batch_pages=512, held_pages=0, last_host_session_id=None,
                 stats_keys=STATS_KEYS)


# ---- (a) the malformed mix -----------------------------------------------------------------------
def _valid_frames() -> list[bytes]:
    status = SimAgent("tcp://x", "m").status_message()
    return [encode(_hello("m"), 1), encode(status, 2),
            encode(Lock(pages=PageRanges(((5, 3), (20, 1))), adopt=False), 3),
            encode(Unlock(pages=PageRanges(((5, 3),))), 4), encode(Heartbeat(), 5), encode(Bye(reason="x"), 6),
            encode(GetStatus(), 7)]


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(9 if depth < 2 else 6)
    if choice == 0:
        return rng.randint(-(1 << 63), (1 << 64) - 1)
    if choice == 1:
        return rng.choice([float("nan"), float("inf"), -1.5, 1e308, 0.0])
    if choice == 2:
        return rng.randbytes(rng.randint(0, 40)).decode("latin-1")
    if choice == 3:
        return rng.randbytes(rng.randint(0, 40))
    if choice == 4:
        return rng.choice([None, True, False])
    if choice == 5:
        return rng.randint(0, 1000)
    if choice == 6:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    return {rng.choice(["vm_id", "pages", "stats", "x", "memsz_bytes", ""]): _random_value(rng, depth + 1)
            for _ in range(rng.randint(0, 5))}


def _bad_envelope(rng: random.Random) -> bytes:
    kind = rng.choice([*KINDS_NAMES, "nope", ""])
    version = rng.choice([PROTOCOL_VERSION] * 6 + [1, 2, 4, "3", None])
    seq = rng.choice([rng.randint(0, 1 << 62), -1, (1 << 64) - 1, "1", None])
    body = {rng.choice(["vm_id", "pages", "stats", "adopt", "memsz_bytes", "reason", "kind"]): _random_value(rng)
            for _ in range(rng.randint(0, 6))}
    return msgpack.packb({"v": version, "kind": kind, "seq": seq, "body": body}, use_bin_type=True)


def _mutated(rng: random.Random, base: bytes) -> bytes:
    data = bytearray(base)
    for _ in range(rng.randint(1, 3)):
        how = rng.randrange(4)
        if how == 0 and data:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif how == 1 and data:
            del data[rng.randrange(len(data)):]
        elif how == 2 and data:
            at = rng.randrange(len(data))
            data[at:at] = data[at:at + rng.randint(1, 16)]
        else:
            at = rng.randrange(len(data) + 1)
            data[at:at] = rng.randbytes(rng.randint(1, 16))
    return bytes(data)


def flood(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    bases = _valid_frames()
    context = _context()
    sockets = [_dealer(context, args.endpoint) for _ in range(args.sockets)]
    large_at = set(rng.sample(range(args.frames), min(args.large, args.frames)))
    mix: Counter[str] = Counter()
    started = time.monotonic()
    sent = 0
    try:
        for index in range(args.frames):
            if index % 1000 == 0 and time.monotonic() - started > args.max_seconds:
                break
            sock = sockets[index % len(sockets)]
            if index in large_at:
                mix["large"] += 1
                sock.send(rng.randbytes(rng.randint(64 << 10, MAX_FRAME_BYTES - 1024)))
            else:
                roll = rng.random()
                if roll < 0.40:
                    mix["random"] += 1
                    sock.send(rng.randbytes(rng.randint(0, 512)))
                elif roll < 0.70:
                    mix["mutated"] += 1
                    sock.send(_mutated(rng, rng.choice(bases)))
                elif roll < 0.85:
                    mix["multipart"] += 1
                    sock.send_multipart([rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(2, 5))])
                else:
                    mix["bad_envelope"] += 1
                    sock.send(_bad_envelope(rng))
            sent += 1
        send_s = time.monotonic() - started
        replies_read = _read_replies_until_quiet(sockets, args.quiet_s, args.max_seconds)
    finally:
        for sock in sockets:  # let what is queued reach hostd before the connections go
            sock.close(linger=20_000)
        context.term()
    return {"attacker": "flood", "frames": sent, "mix": dict(mix), "send_s": round(send_s, 2),
            "replies_read_after_send": replies_read, "total_s": round(time.monotonic() - started, 2)}


def _read_replies_until_quiet(sockets: list[zmq.Socket], quiet_s: float, max_s: float) -> int:
    """Hold the connections open until hostd has answered everything they sent: libzmq drops
    what a ROUTER has received from a peer but not yet read the moment that peer disconnects, so
    closing right after the last send lost up to 80 % of the flood (how many depended on how far
    behind hostd was). hostd answers nearly every malformed frame; once no answer has come for
    `quiet_s`, it has read them all. The replies were left unread during the flood on purpose."""
    poller = zmq.Poller()
    for sock in sockets:
        poller.register(sock, zmq.POLLIN)
    read, last_reply, deadline = 0, time.monotonic(), time.monotonic() + max_s
    while time.monotonic() - last_reply < quiet_s and time.monotonic() < deadline:
        for sock, _ in poller.poll(100):
            while True:
                try:
                    sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                read, last_reply = read + 1, time.monotonic()
    return read


def oversize(args: argparse.Namespace) -> dict[str, Any]:
    """Frames over MAX_FRAME_BYTES: libzmq (MAXMSGSIZE) drops each with its connection."""
    rng = random.Random(args.seed)
    context = _context()
    started = time.monotonic()
    try:
        sock = _dealer(context, args.endpoint)
        for _ in range(args.frames):
            sock.send(rng.randbytes(rng.randint(MAX_FRAME_BYTES + 1, MAX_FRAME_BYTES + (256 << 10))))
            time.sleep(0.02)
        sock.close(linger=5_000)
    finally:
        context.destroy(linger=0)
    return {"attacker": "oversize", "frames": args.frames, "total_s": round(time.monotonic() - started, 2)}


# ---- S12: codec CPU before authentication -----------------------------------------------------
def varint_bomb_frame(seq: int, size: int) -> bytes:
    """A valid-looking `lock` whose pages bin is `size` one-byte varints (msgpack is fine)."""
    body = {"pages": b"\x01" * size, "adopt": False}
    return msgpack.packb({"v": PROTOCOL_VERSION, "kind": "lock", "seq": seq, "body": body}, use_bin_type=True)


def varint_bomb(args: argparse.Namespace) -> dict[str, Any]:
    context = _context()
    started = time.monotonic()
    size = min(args.bytes, MAX_FRAME_BYTES - 64)
    frame = varint_bomb_frame(1, size)
    assert len(frame) <= MAX_FRAME_BYTES
    answers: Counter[str] = Counter()
    try:
        sock = _dealer(context, args.endpoint)
        for _ in range(args.frames):
            sock.send(frame)
        sent_s = time.monotonic() - started
        deadline = time.monotonic() + args.max_seconds
        while sum(answers.values()) < args.frames and time.monotonic() < deadline and sock.poll(500):
            answers[_code_name(decode(sock.recv()).message)] += 1
    finally:
        context.destroy(linger=0)
    return {"attacker": "varint-bomb", "frames": args.frames, "frame_bytes": len(frame), "send_s": round(sent_s, 2),
            "answered": dict(answers), "total_s": round(time.monotonic() - started, 2)}


# ---- S9: lock frames of many one-page ranges -----------------------------------------------------
def range_bomb(args: argparse.Namespace) -> dict[str, Any]:
    """Registered (its own vm, memsz = host memory), then two kinds of frames, `window` in flight:
    `wide` locks of 32,768 one-page ranges (over the batch limit: refused, but only after decoding),
    and `front` locks of 512 one-page ranges, each batch below the previous one (every insert at the
    front of the ledger), with unlocks of the oldest batch once the ledger is full."""
    context = _context()
    started = time.monotonic()
    answers: Counter[str] = Counter()
    agent = SimAgent(args.endpoint, args.vm_id, args.memsz_mib * MiB, context=context).connect()
    try:
        welcome = agent.hello()
        if not isinstance(welcome, Welcome):
            return {"attacker": "range-bomb", "refused": _code_name(welcome) if welcome else "timeout"}
        wide = PageRanges(tuple((2 * i, 1) for i in range(32_768)))
        top = 1 << 40
        batches: list[PageRanges] = []
        in_flight = 0
        sent = 0
        deadline = started + args.max_seconds
        while sent < args.frames and time.monotonic() < deadline:
            while in_flight < args.window and sent < args.frames:
                if args.mode == "wide" or (args.mode == "mixed" and sent % 2):
                    agent.send(Lock(pages=wide, adopt=True))
                else:
                    base = top - 1024 * (len(batches) + 1)
                    batch = PageRanges(tuple((base + 2 * i, 1) for i in range(512)))
                    if len(batches) * 512 + 512 > args.memsz_mib * 256:  # ledger full: free the oldest
                        agent.send(Unlock(pages=batches.pop(0)))
                    else:
                        batches.append(batch)
                        agent.send(Lock(pages=batch, adopt=True))
                sent += 1
                in_flight += 1
            if agent._sock.poll(1000):
                answers[_code_name(decode(agent._sock.recv()).message)] += 1
                in_flight -= 1
        drain = time.monotonic() + 10
        while in_flight and time.monotonic() < drain and agent._sock.poll(500):
            answers[_code_name(decode(agent._sock.recv()).message)] += 1
            in_flight -= 1
    finally:
        agent.close()
        context.destroy(linger=0)
    return {"attacker": "range-bomb", "mode": args.mode, "frames": sent, "answered": dict(answers),
            "total_s": round(time.monotonic() - started, 2)}


# ---- S10: the PFN ledger ----------------------------------------------------------------------------
def pfn_squat(args: argparse.Namespace) -> dict[str, Any]:
    """`vms` fake PFN vms (kept alive by heartbeats), then a squatter locking one-page PFN ranges
    (each range checked against every other PFN vm's ledger), `window` frames in flight."""
    context = _context()
    started = time.monotonic()
    fakes: list[SimAgent] = []
    joined: Counter[str] = Counter()
    answers: Counter[str] = Counter()
    try:
        for index in range(args.vms):
            agent = SimAgent(args.endpoint, f"{args.prefix}{index}", 64 * MiB, context=context, page_kind="pfn")
            agent.connect()
            fakes.append(agent)
        pending = list(fakes)
        while pending and time.monotonic() - started < args.max_seconds:
            for agent in pending:
                agent.send(agent.hello_message())
            retry = []
            for agent in pending:
                reply = decode(agent._sock.recv()).message if agent._sock.poll(3000) else None
                joined[_code_name(reply) if reply else "timeout"] += 1
                if not isinstance(reply, Welcome):
                    retry.append(agent)
            pending = retry
            if pending:
                time.sleep(0.5)
        join_s = time.monotonic() - started
        squatter = fakes[0]
        base = 0
        in_flight = sent = 0
        last_beat = time.monotonic()
        deadline = started + args.max_seconds
        while sent < args.frames and time.monotonic() < deadline:
            while in_flight < args.window and sent < args.frames:
                squatter.send(Lock(pages=PageRanges(tuple((base + 2 * i, 1) for i in range(512))), adopt=True))
                base += 1024
                sent += 1
                in_flight += 1
            if squatter._sock.poll(500):
                answers[_code_name(decode(squatter._sock.recv()).message)] += 1
                in_flight -= 1
            if time.monotonic() - last_beat > 0.5:
                last_beat = time.monotonic()
                for agent in fakes[1:]:
                    agent.send(Heartbeat())
        drain = time.monotonic() + 10
        while in_flight and time.monotonic() < drain and squatter._sock.poll(500):
            answers[_code_name(decode(squatter._sock.recv()).message)] += 1
            in_flight -= 1
    finally:
        for agent in fakes:
            agent.close()
        context.destroy(linger=0)
    return {"attacker": "pfn-squat", "vms": args.vms, "joined": dict(joined), "join_s": round(join_s, 2),
            "frames": sent, "answered": dict(answers), "squatted_pages": base // 2,
            "total_s": round(time.monotonic() - started, 2)}


# ---- S11: state per identity ---------------------------------------------------------------------
def identities(args: argparse.Namespace) -> dict[str, Any]:
    """`count` one-shot identities: a connection, a hello, its answer (or not), gone."""
    context = _context()
    started = time.monotonic()
    answers: Counter[str] = Counter()
    latencies: list[float] = []
    hello_bytes = 0
    try:
        for first in range(0, args.count, args.batch):
            if time.monotonic() - started > args.max_seconds:
                break
            batch = []
            for index in range(first, min(args.count, first + args.batch)):
                sock = _dealer(context, args.endpoint)
                frame = encode(_hello(f"{args.prefix}-{index}"), 1)
                hello_bytes = len(frame)
                sock.send(frame)
                batch.append((sock, time.monotonic()))
            poller = zmq.Poller()
            for sock, _t in batch:
                poller.register(sock, zmq.POLLIN)
            waiting = {sock: t for sock, t in batch}
            deadline = time.monotonic() + args.answer_timeout
            while waiting and time.monotonic() < deadline:
                for sock, _event in poller.poll(100):
                    if sock in waiting:
                        latencies.append(time.monotonic() - waiting.pop(sock))
                        answers[_code_name(decode(sock.recv()).message)] += 1
                        poller.unregister(sock)
            answers["unanswered"] += len(waiting)
            for sock, _t in batch:
                sock.close(linger=0)
    finally:
        context.destroy(linger=0)
    latencies.sort()

    def pick(q: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 1) if latencies else None

    return {"attacker": "identities", "count": args.count, "hello_bytes": hello_bytes, "answers": dict(answers),
            "answer_p50_ms": pick(0.5), "answer_p99_ms": pick(0.99), "total_s": round(time.monotonic() - started, 2)}


# ---- S13: sustained valid traffic ---------------------------------------------------------------
def status_flood(args: argparse.Namespace) -> dict[str, Any]:
    """`vms` registered attacker vms sending valid statuses as fast as the sockets take them."""
    context = _context()
    started = time.monotonic()
    agents = []
    sent = 0
    try:
        for index in range(args.vms):
            agent = SimAgent(args.endpoint, f"{args.prefix}{index}", 64 * MiB, context=context).connect()
            if not isinstance(agent.hello(), Welcome):
                return {"attacker": "status-flood", "refused": index}
            agents.append(agent)
        frames = [encode(agent.status_message(), 10) for agent in agents]
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            for agent, frame in zip(agents, frames, strict=True):
                for _ in range(100):
                    agent._sock.send(frame)
                sent += 100
    finally:
        for agent in agents:
            agent.close()
        context.destroy(linger=0)
    return {"attacker": "status-flood", "vms": args.vms, "frames": sent,
            "total_s": round(time.monotonic() - started, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, run: Any, **defaults: Any) -> argparse.ArgumentParser:
        sub = commands.add_parser(name)
        sub.add_argument("--endpoint", required=True)
        sub.add_argument("--max-seconds", type=float, default=defaults.pop("max_seconds", 40))
        sub.add_argument("--seed", type=int, default=1)
        for key, value in defaults.items():
            sub.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
        sub.set_defaults(run=run)
        return sub

    command("flood", flood, frames=50_000, sockets=3, large=52, quiet_s=5.0)
    command("oversize", oversize, frames=60)
    command("varint-bomb", varint_bomb, frames=150, bytes=MAX_FRAME_BYTES)
    command("range-bomb", range_bomb, vm_id="rangebomb", frames=400, window=64, memsz_mib=1024, mode="front")
    command("pfn-squat", pfn_squat, vms=1000, frames=100, window=32, prefix="pfn")
    command("identities", identities, count=5000, prefix="id", batch=250, answer_timeout=5.0, max_seconds=120)
    command("status-flood", status_flood, vms=4, seconds=10.0, prefix="sf")
    args = parser.parse_args(argv)
    summary = args.run(args)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["Status", "varint_bomb_frame"]
