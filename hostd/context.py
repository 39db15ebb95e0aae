"""What hostd's planes share: the config, the live settings, the vm registry and the ledger,
counters, the event buffer and the frame helpers. No I/O: time is passed in."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from hostd import policy
from hostd.config import HostConfig, VmParams
from hostd.ledger import Ledger
from hostd.registry import Registry, VmRecord
from hostd.status_doc import StatusDocument, VmStatus
from protocol import PAGE_SIZE_BYTES, Error, ErrorCode, Message, encode
from protocol.limits import MAX_FRAME_BYTES

log = logging.getLogger("hostd.core")

Outgoing = list[tuple[bytes, bytes]]


@dataclass
class HostSettings:
    """The live, changeable host parameters (balloonctl host ...)."""

    host_memory_pages: int
    idle_tax_ratio: float
    ctl_max_percent: int
    sample_period_ms: int
    balance_period_ms: int
    sliding_min_free: bool

    @classmethod
    def from_config(cls, config: HostConfig) -> HostSettings:
        return cls(
            host_memory_pages=config.effective_host_memory_bytes // PAGE_SIZE_BYTES,
            idle_tax_ratio=config.idle_tax_ratio, ctl_max_percent=config.ctl_max_percent,
            sample_period_ms=config.sample_period_ms, balance_period_ms=config.balance_period_ms,
            sliding_min_free=config.sliding_min_free,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "host_memory_bytes": self.host_memory_pages * PAGE_SIZE_BYTES,
            "idle_tax_ratio": self.idle_tax_ratio,
            "ctl_max_percent": self.ctl_max_percent,
            "sample_period_ms": self.sample_period_ms,
            "balance_period_ms": self.balance_period_ms,
            "sliding_min_free": self.sliding_min_free,
        }


class CoreContext:
    def __init__(self, config: HostConfig, session_id: str, now_ms: int, max_pfn: int | None) -> None:
        self.config = config
        self.session_id = session_id
        self.started_ms = now_ms
        self.settings = HostSettings.from_config(config)
        self.gains = policy.EwmaGains()
        self.registry = Registry(config.host_targets)
        self.ledger = Ledger(max_pfn=max_pfn)
        self.protocol_errors: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()
        self.events: list[dict[str, Any]] = []
        self.pending_triggers: dict[str, None] = {}  # ordered set of reasons for the next recompute
        self.recompute_urgent = False  # one of them cannot wait for MEMBERSHIP_RECOMPUTE_MS (core.py)
        self._snapshot_cache: tuple[int, StatusDocument] | None = None
        # Each live vm's entry of the status document, as of `status_generation` (hostd/snapshot.py):
        # rebuilt only for a vm whose own frame (or a change of everything) came since.
        self.vm_status_cache: dict[str, tuple[VmRecord, int, VmStatus]] = {}
        self.status_generation = 0
        # balloonctl's changes, kept across restarts by the server (settings_file): host keys
        # changed from the config, and per-vm settings and manual targets.
        self.host_overrides: dict[str, Any] = {}
        self.vm_overrides: dict[str, dict[str, Any]] = {}
        self._seq = 0

    @property
    def state(self) -> policy.State:
        return self.registry.state

    # ---- the status document's caches ---------------------------------------------------------
    @property
    def snapshot_cache(self) -> tuple[int, StatusDocument] | None:
        """The last status document (hostd/core.py's cached_snapshot). Dropping it (= None)
        drops every vm's cached entry too: a change outside one agent's frames (the control
        plane's settings, hostd's cgroup readings, a recompute) may show in any vm's entry."""
        return self._snapshot_cache

    @snapshot_cache.setter
    def snapshot_cache(self, value: tuple[int, StatusDocument] | None) -> None:
        if value is None:
            self.status_generation += 1
        self._snapshot_cache = value

    def vm_changed(self, vm_id: str | None) -> None:
        """An agent's frame changed what the document shows of its own vm (and of the host)."""
        self._snapshot_cache = None
        if vm_id is not None:
            self.vm_status_cache.pop(vm_id, None)

    def host_changed(self) -> None:
        """The tick: host figures (state, free memory, lost and forgotten vms) may have changed,
        no live vm's own entry (a recompute drops them all: `snapshot_cache = None`)."""
        self._snapshot_cache = None

    # ---- frames and events -------------------------------------------------------------------
    def frame(self, message: Message, seq: int | None = None, max_frame_bytes: int = MAX_FRAME_BYTES) -> bytes:
        if seq is None:
            self._seq += 1
            seq = self._seq
        return encode(message, seq, max_frame_bytes)

    def error(self, code: ErrorCode, detail: str, in_reply_to: int | None) -> bytes:
        return self.frame(Error(code=int(code), detail=detail[:1000], in_reply_to=in_reply_to), in_reply_to)

    def event(self, now_ms: int, kind: str, **fields: Any) -> None:
        self.events.append({"t_ms": now_ms - self.started_ms, "event": kind, "state": self.state, **fields})

    def request_recompute(self, trigger: str, urgent: bool = True) -> None:
        """Joins, leaves and state changes recompute at the next tick (≤ 100 ms), once for all
        of them: 2,000 agents re-registering after a restart cost one recompute, not 2,000.
        Not `urgent` (joins, leaves, losses): see core.recompute_due."""
        self.pending_triggers[trigger] = None
        self.recompute_urgent |= urgent

    # ---- derived figures ---------------------------------------------------------------------
    def thresholds(self) -> policy.Thresholds:
        return policy.thresholds(self.settings.host_memory_pages, self.settings.sliding_min_free)

    def free_pages(self) -> int:
        return self.registry.free_pages(self.settings.host_memory_pages)

    def update_state(self, now_ms: int) -> None:
        """After usage changed: the free-memory state moves (the one place that checks it)."""
        old = self.registry.state
        new_state = self.registry.next_state(self.settings.host_memory_pages, self.thresholds())
        if new_state is None:
            return
        free = self.free_pages() * PAGE_SIZE_BYTES
        self.events.append({"t_ms": now_ms - self.started_ms, "event": "state", "state": new_state,
                            "old": old, "new": new_state, "free_bytes": free})
        log.info("free memory state %s → %s (free %d MiB)", old, new_state, free >> 20)
        self.request_recompute(f"state {old} → {new_state}")

    def memsz_cap(self, vm: VmRecord) -> int:
        """What hostd can see of a vm's size: its cgroup's own limit where hostd reads it (a
        guest may be larger than the host: that is overcommit), else host memory."""
        limit = vm.host.cgroup_limit_pages
        return self.settings.host_memory_pages if limit is None else limit

    def initial_params(self, vm_id: str) -> VmParams:
        params = self.config.vms.get(vm_id, VmParams())
        saved = self.vm_overrides.get(vm_id, {}).get("params")
        if saved:
            values = {"shares": params.shares, "reservation_bytes": params.reservation_bytes,
                      "limit_bytes": params.limit_bytes, "maxmemctl_bytes": params.maxmemctl_bytes, **saved}
            params = VmParams(**values)
        return params

    def initial_manual_target(self, vm_id: str) -> int | None:
        value = self.vm_overrides.get(vm_id, {}).get("manual_balloon_pages")
        return value if isinstance(value, int) else None

    def forget(self, vm: VmRecord) -> None:
        """A dead vm leaves the table (its settings stay in the config and settings_file)."""
        self.ledger.pop(vm.vm_id)
        self.registry.forget(vm)
        self.vm_status_cache.pop(vm.vm_id, None)
        self.counters["vms_forgotten"] += 1
