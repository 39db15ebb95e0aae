"""A slow host and a stalling agent (TCG at load: hostd answering seconds late, the agent's
loop stuck for seconds in an mlock that reclaims) against the real HostCore, with a PFN pinner
whose freed frames are the next ones pinned (tests/unit/test_pfn_ledger.FramePinner)."""

from __future__ import annotations

import heapq
import random

import pytest

from protocol import LockResult, RangeStatus, decode, encode
from tests.unit.agent_harness import Agent, Loopback
from tests.unit.test_pfn_ledger import FramePinner, held_frames, ledger_frames


class SlowLoopback(Loopback):
    """Host replies arrive `latency_ms` after the host sent them; the agent can stall. Loopback's
    pump carries the agent's frames; its replies go through this `deliver` (delayed)."""

    def __init__(self, agent: Agent, latency_ms: int, **host_config: object) -> None:
        super().__init__(agent, **host_config)
        self.latency_ms = latency_ms
        self.in_flight: list[tuple[int, int, bytes, bytes]] = []  # (due, order, identity, frame)
        self.order = 0

    def deliver(self, out: list[tuple[bytes, bytes]]) -> None:
        for identity, frame in out:
            self.order += 1
            heapq.heappush(self.in_flight, (self.agent.now + self.latency_ms, self.order, identity, frame))

    def arrive(self) -> None:
        while self.in_flight and self.in_flight[0][0] <= self.agent.now:
            _due, _order, identity, frame = heapq.heappop(self.in_flight)
            if identity != self.identity:
                continue
            self.to_agent.append(decode(frame).message)
            self.session.on_frame(frame, self.agent.now)

    def run(self, ms: int, step_ms: int = 10, stall: tuple[int, int] | None = None) -> None:
        end = self.agent.now + ms
        while self.agent.now < end:
            self.agent.now += step_ms
            self.deliver(self.core.tick(self.agent.now))
            if stall and stall[0] <= self.agent.now < stall[1]:
                continue  # the agent's loop is stuck (an mlock reclaiming under TCG)
            self.arrive()
            self.agent.turn()
            self.pump()

    def set_target(self, pages: int | None) -> None:
        from protocol import SetManualTarget

        _reply, out = self.core.handle_control(encode(SetManualTarget(vm_id=self.agent.cfg.vm_id,
                                                                      balloon_target_pages=pages), 1),
                                               self.agent.now, True)
        self.deliver(out)


def slow(latency_ms: int, report_ms: int = 2000) -> SlowLoopback:
    from tests.unit.agent_harness import agent_config
    agent = Agent(agent_config(report_interval_ms=report_ms))
    agent.pinner = FramePinner(agent.pinner.capacity_pages)
    agent.session.pinner = agent.session.motion.pinner = agent.pinner
    lb = SlowLoopback(agent, latency_ms, report_interval_ms=report_ms)
    lb.run(8_000)
    assert lb.session.registered
    return lb


@pytest.mark.parametrize("seed", range(8))
def test_slow_host_and_stalls_converge(seed):
    rng = random.Random(seed)
    lb = slow(rng.choice([50, 300, 900, 2500]))
    pinner = lb.agent.pinner
    target = 30_000
    lb.set_target(target)
    for _ in range(6):
        start = lb.agent.now + rng.randrange(0, 3000)
        lb.run(4_000, stall=(start, start + rng.randrange(500, 9000)))
    lb.run(90_000, step_ms=20)
    dup = sum(r.count for m in lb.to_agent if isinstance(m, LockResult) for r in m.results
              if r.status == RangeStatus.DUPLICATE)
    assert pinner.held_pages == target, (lb.latency_ms, pinner.held_pages, dup, lb.core.counters)
    lb.run(10_000)
    assert ledger_frames(lb) == held_frames(pinner)
    assert lb.core.counters["resets"] == 0


@pytest.mark.parametrize("latency_ms", [300, 1500, 2500])
def test_hellos_repeated_before_a_slow_welcome_leave_the_agent_registered(latency_ms):
    """A host answering seconds late gets several hellos (100 ms backoff, doubling); the first
    is welcomed, later ones may be refused CONFLICT (no secret yet). That refusal changed
    nothing on the host: the agent stays registered and its lock results count."""
    lb = slow(latency_ms)
    lb.set_target(10_000)
    lb.run(60_000, step_ms=20)
    assert lb.session.registered and lb.agent.pinner.held_pages == 10_000
    assert lb.session.counters.expired_requests == 0 and lb.core.counters["resets"] == 0
