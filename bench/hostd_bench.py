"""hostd CPU with 2,000 simulated agents reporting at 1 Hz (goal < 10 % of one core).

    [BENCH_AGENTS=2000] [BENCH_SECONDS=20] python -m bench hostd_bench

A real balloon-hostd process on loopback; a simulator process holds one DEALER per agent,
registers them all, then sends each one's status (every stats value a real agent reports, random numbers)
once per second, spread evenly. hostd's CPU time (user + system, from psutil) is measured
over the steady window, along with how many statuses it answered.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path

import psutil
import zmq

from guestagent.client import STATS_KEYS  # the names a real agent reports
from protocol import Hello, Status, decode, encode
from tests.integration.hostd_proc import HostdProcess

CURRENT_RATIO_INDEX = STATS_KEYS.index("ws_current_ratio")


def simulate(hostd: HostdProcess, agents: int, seconds: float) -> tuple[float, int, int, int]:
    endpoint, hostd_pid = hostd.agent_endpoint, hostd.process.pid
    context = zmq.Context()
    context.set(zmq.MAX_SOCKETS, agents + 100)
    rng = random.Random(1)
    sockets = []
    for index in range(agents):
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, f"sim{index}".encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # the socket options of a real agent (guestagent/client.py)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 5000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        sock.connect(endpoint)
        sock.send(encode(Hello(vm_id=f"sim{index}", memsz_bytes=1 << 30, agent_version="sim", page_kind="vpn",
                               supports_2m=False, cgroup_version=2, max_batch_pages=512, held_pages=0,
                               last_host_session_id=None, stats_keys=STATS_KEYS), 1))
        sockets.append(sock)
    poller = zmq.Poller()
    for sock in sockets:
        poller.register(sock, zmq.POLLIN)

    def drain(timeout_ms: int) -> int:
        received = 0
        for sock, _ in poller.poll(timeout_ms):
            while True:
                try:
                    decode(sock.recv(zmq.NOBLOCK))
                    received += 1
                except zmq.Again:
                    break
        return received

    # Every agent reports once a second from its hello on, as real agents do; the CPU window
    # opens after a warm-up that covers registration.
    process = psutil.Process(hostd_pid)
    interval = 1.0 / agents
    sent = answered = 0
    seq = 1
    started = next_send = time.monotonic()
    warmup_s = 10.0
    cpu_start = None
    while time.monotonic() - started < warmup_s + seconds:
        now = time.monotonic()
        if cpu_start is None and now - started >= warmup_s:
            cpu_start, window_start, sent_before = sum(process.cpu_times()[:2]), now, sent
        while next_send <= now:
            index = sent % agents
            seq += 1
            stats: list[int | float | None] = [rng.randrange(1 << 30) for _ in STATS_KEYS]
            stats[CURRENT_RATIO_INDEX] = rng.random()
            sockets[index].send(encode(Status(
                balloon_pages=0, acked_target_seq=0, refused_pages=0, agent_state="idle", stats=tuple(stats),
                ws_touched_ratio=rng.random(), ws_method="referenced", ws_period_ms=60000), seq))
            sent += 1
            next_send += interval
        answered += drain(1)
    started = window_start
    sent -= sent_before
    elapsed = time.monotonic() - started
    assert cpu_start is not None
    cpu = sum(process.cpu_times()[:2]) - cpu_start
    alive = hostd.status(5000)["host"]["vms_alive"]  # while every agent is still reporting
    for sock in sockets:
        sock.close(linger=0)
    context.term()
    return cpu / elapsed, sent, answered, alive


def main() -> None:
    agents = int(os.environ.get("BENCH_AGENTS", "2000"))
    seconds = float(os.environ.get("BENCH_SECONDS", "20"))
    with tempfile.TemporaryDirectory() as workdir:
        hostd = HostdProcess(Path(workdir), "--host-memory", "4TiB", "--report-interval", "1s",
                             "--log-level", "WARNING")
        try:
            core_share, sent, answered, alive = simulate(hostd, agents, seconds)
        finally:
            hostd.stop()
    print(f"hostd with {agents} simulated agents at 1 Hz for {seconds:.0f} s: {100 * core_share:.1f} % of one core "
          f"(goal < 10 %); statuses sent {sent}, heartbeats back {answered}, vms alive {alive}/{agents}")
