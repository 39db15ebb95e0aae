"""The agent session's state as plain data, and what it hands the loop: numbered sends and
fresh connections (`Wire`). Grouped by job: `Registration` (who the host is and whether it is
there), `Sampling` (timers and working-set periods), `PressureMemory` (the last readings and
the backoff), `Target`, `Pending` requests, and `Counters`. No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from guestagent import agent
from guestagent.cgroup import GuestReading
from guestagent.pinning import Batch
from guestagent.wss import Sample
from protocol import Message, PageRanges

AgentState = Literal["idle", "inflating", "deflating", "refusing", "pressure_deflate", "host_lost"]


@dataclass(frozen=True, slots=True)
class Send:
    """Send `message` with `seq` (encode(message, seq)) on the current connection."""

    seq: int
    message: Message


@dataclass(frozen=True, slots=True)
class Reconnect:
    """Close the connection and open a fresh one (a new routing id at the host); later
    sends go on the new one."""


Action = Send | Reconnect


class Wire:
    """The session's way out: numbers each message and keeps the actions in order."""

    def __init__(self) -> None:
        self.seq = 0
        self.actions: list[Action] = []

    def send(self, message: Message) -> int:
        self.seq += 1
        self.actions.append(Send(self.seq, message))
        return self.seq

    def reconnect(self) -> None:
        self.actions.append(Reconnect())

    def take(self) -> list[Action]:
        actions, self.actions = self.actions, []
        return actions


@dataclass
class Target:
    """The host's target as the balloon follows it."""

    pages: int = 0
    seq: int = 0  # the session's high-water mark (0: none accepted yet)
    seq_ms: int = 0  # when the high-water mark last moved
    absurd_seq_logged: bool = False  # once per session
    movement: tuple[int, int] | None = None  # (started_ms, balloon pages then) toward the target
    refused_pages: int = 0  # what the guest could not give since the target was set


@dataclass
class Pending:
    """A lock/unlock sent and not yet answered. `batch` is the pinned batch it concerns
    (None when the pages were already freed: pressure deflate frees first, reports after)."""

    kind: Literal["lock", "unlock"]
    batch: Batch | None
    adopt: bool = False
    sent_ms: int = 0
    pages: PageRanges | None = None  # an unlock's pages (re-sent if its reply never comes)


@dataclass
class Counters:
    inflated_pages: int = 0
    deflated_pages: int = 0
    refused_pages: int = 0
    pressure_deflates: int = 0
    protocol_errors: int = 0
    expired_requests: int = 0  # lock/unlock replies that never came (each expiry: one re-hello)
    absurd_target_seqs: int = 0  # set_targets ignored for a seq far above the high-water mark
    floored_welcomes: int = 0  # welcomes whose periods were raised to the agent's floors


@dataclass
class PressureMemory:
    """What the guest's last readings left: what it can give (paced and not), the pressure
    backoff, and what the next pressure and growth checks compare against."""

    last_reading: GuestReading | None = None
    givable_bytes: int = 0  # paced: what the next pins may spend
    headroom_bytes: int = 0  # unpaced: everything the guest could give (pressure and refusal decisions)
    backoff: agent.PressureBackoff = field(default_factory=agent.PressureBackoff)
    pinned_since_check: bool = False
    last_check_ms: int = 0
    # The reading the guest's demand growth is measured from, with the balloon's pages and
    # the time at that reading: ≥ 20 ms back, so a wake-up right after a check still sees
    # a rate, not the noise of a few pages.
    growth_ref: tuple[GuestReading, int, int] | None = None


@dataclass
class Registration:
    """Who the host is to this agent, and whether it is there."""

    registered: bool = False
    host_session: str | None = None
    vm_secret: str | None = None  # from the latest welcome; presented on re-hello, never logged
    # When a send first failed with no connection up (None: the last send got through or a
    # frame came in). Time alone proves nothing: the agent itself may have stalled for
    # seconds pinning pages in a thrashing guest while the host was there all along.
    unreachable_since_ms: int | None = None
    host_lost_since_ms: int | None = None
    next_hello_ms: int = 0
    hello_backoff_ms: int = 100
    last_refusal: int | None = None  # the error code the host last refused a hello with (logged once)


@dataclass
class Sampling:
    """The working-set periods and the agent's timers."""

    report_interval_ms: int
    host_timeout_ms: int
    ws_period_ms: int
    next_report_ms: int = 0
    next_check_ms: int = 0
    next_ws_ms: int = 0
    last_ws: Sample | None = None
    ws_current: Sample | None = None  # the running period so far, as of the last report
    ws_samples: int = 0  # completed sampling periods: the host averages each one once
