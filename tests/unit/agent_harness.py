"""Drivers for the sans-IO agent: an `AgentSession` on a `FakePinner` with a fake clock, alone
(`Agent`) or wired to a real `hostd.core.HostCore` by encoded frames in memory (`Loopback`).
No sockets, no root, no cgroup: the guest is a reading computed from the balloon's size."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from guestagent.cgroup import GuestReading
from guestagent.config import AgentConfig
from guestagent.pinning import FakePinner
from guestagent.session import AgentSession
from guestagent.state import Reconnect, Send
from guestagent.wss import Sample
from hostd.config import HostConfig
from hostd.core import HostCore
from protocol import Message, decode, encode

MiB = 1 << 20
PAGE = 4096
HOST_SWAP_FREE = 1 << 30
HOST_AVAILABLE = 4 << 30


def reading(**overrides: object) -> GuestReading:
    base: dict[str, object] = dict(
        cgroup_version=2, limit_bytes=256 * MiB, usage_bytes=60 * MiB, anon_bytes=40 * MiB, file_bytes=10 * MiB,
        active_anon_bytes=30 * MiB, inactive_anon_bytes=10 * MiB, active_file_bytes=5 * MiB,
        inactive_file_bytes=5 * MiB, unevictable_bytes=0, swap_used_bytes=0, swap_limit_bytes=None,
        swap_in_pages=0, swap_out_pages=0, minor_faults=0, major_faults=0, refault_anon_pages=0, oom_events=0,
        oom_kill_events=0, high_events=0, max_events=0, psi_some_avg10=0.0, psi_full_avg10=0.0,
        psi_full_total_us=0,
    )
    base.update(overrides)
    return GuestReading(**base)  # type: ignore[arg-type]


@dataclass
class Guest:
    """A guest whose usage is its workload plus the balloon's pinned (not dropped) pages."""

    workload_bytes: int = 60 * MiB
    limit_bytes: int = 256 * MiB
    extra: dict[str, object] = field(default_factory=dict)

    def read(self, pinner: FakePinner) -> GuestReading:
        balloon = (pinner.held_pages - pinner.dropped_pages) * PAGE
        return replace(reading(limit_bytes=self.limit_bytes, usage_bytes=self.workload_bytes + balloon,
                               active_anon_bytes=self.workload_bytes // 2, inactive_anon_bytes=0,
                               unevictable_bytes=balloon), **self.extra)


def agent_config(**overrides: object) -> AgentConfig:
    base: dict[str, object] = dict(vm_id="a", batch_pages=512, report_interval_ms=1000, check_interval_ms=100,
                                   ws_period_ms=10_000, host_grace_ms=2_000)
    base.update(overrides)
    return AgentConfig(**base)  # type: ignore[arg-type]


class Agent:
    """An AgentSession on a FakePinner, driven like guestagent.client drives it."""

    def __init__(self, cfg: AgentConfig | None = None, guest: Guest | None = None, now: int = 1_000) -> None:
        self.cfg = cfg or agent_config()
        self.guest = guest or Guest()
        memsz = self.guest.limit_bytes
        self.pinner = FakePinner(memsz // PAGE)
        self.session = AgentSession(self.cfg, self.pinner, memsz, 2, self.guest.read(self.pinner))
        self.now = now
        self.connection = 1  # bumped by every Reconnect: replies to an older one are lost
        self.touched_ratio: float | None = None  # set: every period ends with this "referenced" sample
        self.period_ends: list[int] = []  # when each sampling period ended
        self.session.start(now)

    def read_guest(self) -> None:
        self.session.on_reading(self.guest.read(self.pinner), HOST_SWAP_FREE, HOST_AVAILABLE, self.now)

    def turn(self) -> None:
        """One pass of the agent's loop body at `now` (no sampler unless `touched_ratio` is set:
        periods end without a sample)."""
        s = self.session
        if s.due_check(self.now):
            self.read_guest()
        s.tick(self.now)
        if s.due_ws_period(self.now):
            self.period_ends.append(self.now)
            s.end_ws_period(None if self.touched_ratio is None
                            else Sample(ratio=self.touched_ratio, method="referenced",
                                        period_ms=s.sampling.ws_period_ms))
        if s.due_report(self.now):
            s.report(None)

    def take(self) -> list[Send | Reconnect]:
        actions = self.session.take_actions()
        self.connection += sum(isinstance(a, Reconnect) for a in actions)
        return actions

    def sent(self) -> list[Message]:
        return [a.message for a in self.take() if isinstance(a, Send)]


class Loopback:
    """A real HostCore and a real AgentSession passing encoded frames in memory. Each agent
    connection is its own routing id (as hostd's ROUTER assigns one per connection)."""

    def __init__(self, agent: Agent | None = None, **host_config: object) -> None:
        host_config.setdefault("host_memory_bytes", 1024 * MiB)
        host_config.setdefault("report_interval_ms", 1000)
        host_config.setdefault("sample_period_ms", 10_000)
        self.core = HostCore(HostConfig(**host_config), "sess", now_ms=0,  # type: ignore[arg-type]
                             control_token="t0ken-for-unit-tests-0123456789")
        self.agent = agent or Agent()
        self.host_down = False  # sends fail (ZMQ_IMMEDIATE with no connection up)
        self.drop_replies = False  # the host handles frames but its replies never arrive
        self.to_host: list[Message] = []
        self.to_agent: list[Message] = []

    @property
    def session(self) -> AgentSession:
        return self.agent.session

    @property
    def identity(self) -> bytes:
        return b"\x00conn%d" % self.agent.connection

    def deliver(self, out: list[tuple[bytes, bytes]]) -> None:
        for identity, frame in out:
            if identity != self.identity or self.host_down or self.drop_replies:
                continue  # an old connection, or lost on the way
            self.to_agent.append(decode(frame).message)
            self.session.on_frame(frame, self.agent.now)

    def pump(self) -> None:
        """Carry the agent's actions to the host and the host's answers back, until quiet."""
        for _ in range(10_000):
            actions = self.agent.take()
            if not actions:
                return
            for action in actions:
                if isinstance(action, Reconnect):
                    continue
                if self.host_down:
                    self.session.on_send(False, self.agent.now)
                    continue
                self.session.on_send(True, self.agent.now)
                self.to_host.append(action.message)
                self.deliver(self.core.handle_agent(self.identity, encode(action.message, action.seq),
                                                    self.agent.now))
        raise AssertionError("the loopback never went quiet")

    def run(self, ms: int, step_ms: int = 10) -> None:
        """`ms` of both loops: the host's tick, then the agent's turn, every `step_ms`."""
        end = self.agent.now + ms
        while self.agent.now < end:
            self.agent.now += step_ms
            self.deliver(self.core.tick(self.agent.now))  # the host runs on; its frames may be lost
            self.agent.turn()
            self.pump()

    def set_target(self, pages: int | None) -> None:
        from protocol import SetManualTarget

        _reply, out = self.core.handle_control(encode(SetManualTarget(vm_id=self.agent.cfg.vm_id,
                                                                      balloon_target_pages=pages), 1),
                                               self.agent.now, True)
        self.deliver(out)
        self.pump()

    def set_host_params(self, **params: object) -> None:
        """`balloonctl host KEY=VALUE...`: the operator changes a host setting."""
        from protocol import ControlOk, SetHostParams

        reply, out = self.core.handle_control(encode(SetHostParams(params=params), 1),  # type: ignore[arg-type]
                                              self.agent.now, True)
        assert isinstance(decode(reply).message, ControlOk), decode(reply).message
        self.deliver(out)
        self.pump()

    def vm(self) -> dict[str, object]:
        """The vm's entry of the host's status document (what `balloonctl status --json` shows)."""
        [vm] = [v for v in self.core.snapshot(self.agent.now)["vms"] if v["vm_id"] == self.agent.cfg.vm_id]
        return dict(vm)

    def host_ledger_pages(self) -> int:
        return int(self.vm()["ledger_bytes"]) // PAGE  # type: ignore[call-overload]
