"""The VMkernel's memory policy, pure: snapshots in, decisions (with reasons) out.

Waldspurger 2002 §5.2 — min-funding revocation with an idle memory tax. A vm holding P pages
of which A are active pays ρ = S / (A + k·(P − A)) shares per page (k = 1/(1 − τ)); memory
moves from the vm with the lowest ρ to the others until all unbounded vms pay the same ρ = λ.
Instead of moving pages one at a time, `allocate` solves for λ at once: with x = 1/λ each vm
holds P(x) = clamp(c⁻¹(S·x), reservation, min(limit, memsz)), where c(P) = P for P ≤ A and
A + k(P − A) above (its "taxed size"); Σ P(x) grows with x, so x is found by bisection.

Also here: the working-set estimate (max of slow, fast and fast-with-current-period EWMAs,
§5.3), the free-memory states high/soft/hard/low with hysteresis (§6.3), balloon and swap
targets (MCTLTGT, SWTGT), and admission control (§6.2).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from protocol.limits import PAGE_SIZE_BYTES, PAGES_PER_MIB

SHARES_PER_MIB = {"low": 5, "normal": 10, "high": 20}

State = Literal["high", "soft", "hard", "low"]
STATES: tuple[State, ...] = ("high", "soft", "hard", "low")


# ---- shares and bounds --------------------------------------------------------------------
def resolve_shares(shares: int | str, memsz_pages: int) -> int:
    """low/normal/high = 5/10/20 shares per MiB of memsz; an integer is taken as is."""
    if isinstance(shares, str):
        return SHARES_PER_MIB[shares] * memsz_pages // PAGES_PER_MIB
    return shares


# ---- allocation -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Allocation:
    pages: np.ndarray  # int64 per vm, Σ ≤ available (when reservations fit)
    rho: np.ndarray  # float per vm: shares per taxed page at its allocation
    inverse_lambda: float  # x = 1/λ; inf when nothing is overcommitted
    feasible: bool  # False when Σ reservations > available (then everyone gets its reservation)


def _taxed_size(pages: np.ndarray, active: np.ndarray, k: float) -> np.ndarray:
    return np.where(pages <= active, pages, active + k * (pages - active))


def _untaxed(taxed: np.ndarray, active: np.ndarray, k: float) -> np.ndarray:
    return np.where(taxed <= active, taxed, active + (taxed - active) / k)


def allocate(shares: Sequence[float] | np.ndarray, active_pages: Sequence[float] | np.ndarray,
             reservation_pages: Sequence[int] | np.ndarray, upper_pages: Sequence[int] | np.ndarray,
             available_pages: int, idle_tax: float) -> Allocation:
    """Pages per vm for `available_pages` by the idle-tax water-filling (whole pages, exact sum
    when memory is overcommitted). `upper_pages` = min(limit, memsz)."""
    if not 0.0 <= idle_tax < 1.0:
        raise ValueError(f"idle_tax={idle_tax} must satisfy 0 ≤ τ < 1")
    s = np.asarray(shares, dtype=np.float64)
    a = np.asarray(active_pages, dtype=np.float64)
    r = np.asarray(reservation_pages, dtype=np.float64)
    u = np.maximum(np.asarray(upper_pages, dtype=np.float64), r)
    k = 1.0 / (1.0 - idle_tax)
    n = len(s)

    def rho_at(p: np.ndarray) -> np.ndarray:
        taxed = _taxed_size(p, a, k)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(taxed > 0, s / np.where(taxed > 0, taxed, 1.0), np.inf)

    if n == 0:
        empty = np.zeros(0)
        return Allocation(empty.astype(np.int64), empty, math.inf, True)
    if r.sum() > available_pages:
        pages = r.astype(np.int64)
        return Allocation(pages, rho_at(r), 0.0, False)
    if u.sum() <= available_pages:
        pages = u.astype(np.int64)
        return Allocation(pages, rho_at(u), math.inf, True)

    def pages_at(x: float) -> np.ndarray:
        clipped: np.ndarray = np.clip(_untaxed(s * x, a, k), r, u)
        return clipped

    positive = s > 0
    high = float(np.max(_taxed_size(u, a, k)[positive] / s[positive])) if positive.any() else 0.0
    low = 0.0
    for _ in range(200):  # bisection on x = 1/λ; 200 halvings reach float precision
        middle = (low + high) / 2
        if middle in (low, high):
            break
        if pages_at(middle).sum() > available_pages:
            high = middle
        else:
            low = middle
    exact = pages_at(low)
    pages = np.floor(exact).astype(np.int64)
    # Hand out the pages lost to rounding: largest fractional part first, never above upper,
    # never to a vm with zero shares (it stays pinned at its reservation).
    remainder = int(available_pages - pages.sum())
    eligible = positive & (pages < u)
    while remainder > 0 and eligible.any():
        candidates = np.flatnonzero(eligible)
        order = candidates[np.argsort(-(exact[candidates] - pages[candidates]), kind="stable")][:remainder]
        pages[order] += 1
        remainder -= len(order)
        eligible = positive & (pages < u)
    return Allocation(pages, rho_at(pages.astype(np.float64)), low, True)


# ---- working-set estimate -----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class EwmaGains:
    slow: float = 0.1  # ESX does not publish its gains; these give "fast up, slow down"
    fast: float = 0.5


@dataclass(frozen=True, slots=True)
class WorkingSet:
    """Active fraction of a vm's memory: three EWMAs of sampled touched ratios (§5.3)."""

    slow: float = 1.0  # before any sample a vm counts as fully active: never tax the unknown
    fast: float = 1.0
    fast_current: float = 1.0
    samples: int = 0

    @property
    def ratio(self) -> float:
        return max(self.slow, self.fast, self.fast_current)

    def with_period(self, touched_ratio: float, gains: EwmaGains) -> WorkingSet:
        """A completed sampling period."""
        if self.samples == 0:
            return WorkingSet(touched_ratio, touched_ratio, touched_ratio, 1)
        slow = self.slow + gains.slow * (touched_ratio - self.slow)
        fast = self.fast + gains.fast * (touched_ratio - self.fast)
        return WorkingSet(slow, fast, fast, self.samples + 1)

    def with_current(self, partial_ratio: float, gains: EwmaGains) -> WorkingSet:
        """Counts of the period still running, incrementally: a partial count can only show
        more activity than the fast average, never less (the period is not over)."""
        if self.samples == 0 or partial_ratio <= self.fast:
            if self.fast_current == self.fast:
                return self  # immutable: the same value, without a new object per status
            return WorkingSet(self.slow, self.fast, self.fast, self.samples)
        return WorkingSet(self.slow, self.fast, self.fast + gains.fast * (partial_ratio - self.fast), self.samples)


# ---- free-memory states ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Thresholds:
    """Free pages at which the state changes: below soft → soft, below hard → hard, below
    low → low. `high` is the free memory targets aim for (minFree) and the level free memory
    must pass to return to the high state."""

    high: int
    soft: int
    hard: int
    low: int


@functools.lru_cache(maxsize=8)  # asked after every status (context.update_state); host memory rarely changes
def thresholds(host_memory_pages: int, sliding_scale: bool = False) -> Thresholds:
    """Paper: 6/4/2/1 % of host memory. Sliding scale (vSphere 5+): minFree = 6 % of the first
    4 GiB + 4 % of the next 8 + 2 % of the next 16 + 1 % of the rest; soft/hard/low at
    64/32/16 % of minFree."""
    if not sliding_scale:
        return Thresholds(host_memory_pages * 6 // 100, host_memory_pages * 4 // 100,
                          host_memory_pages * 2 // 100, host_memory_pages // 100)
    gib = (1 << 30) // PAGE_SIZE_BYTES
    min_free = 0.0
    for span_gib, percent in ((4, 6), (8, 4), (16, 2), (math.inf, 1)):
        part = min(host_memory_pages, span_gib * gib) if span_gib != math.inf else host_memory_pages
        min_free += part * percent / 100
        host_memory_pages -= int(part)
        if host_memory_pages <= 0:
            break
    return Thresholds(int(min_free), int(min_free * 0.64), int(min_free * 0.32), int(min_free * 0.16))


def next_state(state: State, free_pages: int, limits: Thresholds) -> State:
    """Down at once when free memory falls below a threshold; up only when free memory passes
    the next threshold above (low → hard at the hard threshold, hard → soft at soft, soft →
    high at high): between soft and high a vm stays in soft until memory is clearly back."""
    if free_pages < limits.low:
        natural: State = "low"
    elif free_pages < limits.hard:
        natural = "hard"
    elif free_pages < limits.soft:
        natural = "soft"
    else:
        natural = "high"
    if STATES.index(natural) >= STATES.index(state):
        return natural
    up_at = {"low": limits.hard, "hard": limits.soft, "soft": limits.high}
    current = state
    while current != "high" and free_pages >= up_at[current]:
        current = STATES[STATES.index(current) - 1]
    return current


# ---- targets -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class VmInput:
    vm_id: str
    memsz_pages: int
    shares: int  # resolved
    reservation_pages: int
    limit_pages: int  # ≤ memsz
    maxmemctl_pages: int | None  # per-vm balloon cap (sched.mem.maxmemctl); None = host cap only
    active_ratio: float  # working-set estimate
    balloon_pages: int  # MCTLSZ now
    agent_alive: bool
    agent_refusing: bool  # the guest said it has nothing left to give
    manual_balloon_pages: int | None  # balloonctl target VM SIZE
    balloon_target_pages: int  # the current MCTLTGT (for "old → new")


@dataclass(frozen=True, slots=True)
class HostInput:
    host_memory_pages: int
    idle_tax: float = 0.75
    ctl_max_percent: int = 65
    sliding_min_free: bool = False


@dataclass(frozen=True, slots=True)
class VmDecision:
    vm_id: str
    alloc_target_pages: int  # SZTGT
    balloon_target_pages: int  # MCTLTGT
    balloon_max_pages: int  # MCTLMAX
    swap_target_pages: int  # SWTGT
    rho: float
    active_pages: int
    reason: str


# Reasons are codes in the arrays (formatting 100k strings would cost more than the policy).
_BALLOON_REASONS = ("fits in its allocation", "idle tax / shares", "capped at MCTLMAX",
                    "high state: no new reclamation", "manual target")
_SWAP_REASONS = ("", "; no agent: swap", "; guest refusing: swap", "; beyond the balloon cap: swap")


@dataclass(frozen=True, slots=True)
class PolicyResult:
    """Targets for every vm as arrays (index = position in the input). `decision(i)` gives
    one vm's targets with a readable reason."""

    vm_ids: list[str]
    alloc_target_pages: np.ndarray
    balloon_target_pages: np.ndarray
    balloon_max_pages: np.ndarray
    swap_target_pages: np.ndarray
    rho: np.ndarray
    active_pages: np.ndarray
    balloon_reason: np.ndarray
    swap_reason: np.ndarray
    idle_tax: float
    available_pages: int
    inverse_lambda: float
    feasible: bool
    notes: list[str] = field(default_factory=list)

    def decision(self, index: int) -> VmDecision:
        reason = _BALLOON_REASONS[self.balloon_reason[index]]
        if self.balloon_reason[index] in (1, 2):
            reason = f"{reason} (τ={self.idle_tax:g}, ρ={self.rho[index]:.4g})"
        return VmDecision(
            vm_id=self.vm_ids[index], alloc_target_pages=int(self.alloc_target_pages[index]),
            balloon_target_pages=int(self.balloon_target_pages[index]),
            balloon_max_pages=int(self.balloon_max_pages[index]),
            swap_target_pages=int(self.swap_target_pages[index]), rho=float(self.rho[index]),
            active_pages=int(self.active_pages[index]), reason=reason + _SWAP_REASONS[self.swap_reason[index]],
        )

    @property
    def decisions(self) -> list[VmDecision]:
        return [self.decision(index) for index in range(len(self.vm_ids))]


def balloon_max_pages(memsz_pages: int, ctl_max_percent: int, maxmemctl_pages: int | None) -> int:
    cap = memsz_pages * ctl_max_percent // 100
    return cap if maxmemctl_pages is None else min(cap, maxmemctl_pages)


def compute_targets(host: HostInput, vms: Sequence[VmInput], state: State) -> PolicyResult:
    """Allocation, balloon and swap targets for every vm.

    Targets aim to keep free memory above the high threshold: the vms share host memory minus
    minFree. In the high state nothing new is reclaimed (balloon targets never rise above the
    current target); in soft/hard/low they follow the allocation. What the balloon cannot
    cover (cap, no agent, guest refusing) becomes the swap target (0 in the high state).
    """
    limits = thresholds(host.host_memory_pages, host.sliding_min_free)
    available = max(0, host.host_memory_pages - limits.high)
    n = len(vms)
    memsz = np.fromiter((v.memsz_pages for v in vms), np.int64, n)
    active = np.minimum(np.fromiter((v.active_ratio for v in vms), np.float64, n) * memsz, memsz)
    reservation = np.minimum(np.fromiter((v.reservation_pages for v in vms), np.int64, n), memsz)
    upper = np.minimum(np.fromiter((v.limit_pages for v in vms), np.int64, n), memsz)
    allocation = allocate(np.fromiter((v.shares for v in vms), np.float64, n), active, reservation, upper,
                          available, host.idle_tax)
    alloc = allocation.pages
    maxmemctl = np.fromiter((-1 if v.maxmemctl_pages is None else v.maxmemctl_pages for v in vms), np.int64, n)
    cap = memsz * host.ctl_max_percent // 100
    cap = np.where(maxmemctl >= 0, np.minimum(cap, maxmemctl), cap)
    wanted = np.maximum(0, memsz - alloc)
    manual = np.fromiter((-1 if v.manual_balloon_pages is None else v.manual_balloon_pages for v in vms), np.int64, n)
    current_target = np.fromiter((v.balloon_target_pages for v in vms), np.int64, n)
    balloon = np.minimum(wanted, cap)
    reason = np.where(wanted == 0, 0, np.where(wanted > cap, 2, 1)).astype(np.int8)
    if state == "high":
        hold = balloon > current_target
        balloon = np.where(hold, current_target, balloon)
        reason = np.where(hold, 3, reason).astype(np.int8)
    is_manual = manual >= 0
    balloon = np.where(is_manual, np.minimum(manual, memsz), balloon)
    reason = np.where(is_manual, 4, reason).astype(np.int8)
    alive = np.fromiter((v.agent_alive for v in vms), bool, n)
    refusing = np.fromiter((v.agent_refusing for v in vms), bool, n)
    held = np.fromiter((v.balloon_pages for v in vms), np.int64, n)
    covered = np.where(alive & ~refusing, balloon, np.where(alive, held, 0))
    swap = np.maximum(0, wanted - covered) if state != "high" else np.zeros(n, np.int64)
    swap_reason = np.where(swap == 0, 0, np.where(~alive, 1, np.where(refusing, 2, 3))).astype(np.int8)
    notes = [] if allocation.feasible else ["reservations exceed available memory"]
    return PolicyResult(
        vm_ids=[v.vm_id for v in vms], alloc_target_pages=alloc, balloon_target_pages=balloon,
        balloon_max_pages=cap, swap_target_pages=swap, rho=allocation.rho, active_pages=active.astype(np.int64),
        balloon_reason=reason, swap_reason=swap_reason, idle_tax=host.idle_tax, available_pages=available,
        inverse_lambda=allocation.inverse_lambda, feasible=allocation.feasible, notes=notes,
    )


def admission_check(reservations_pages: Sequence[int], new_reservation_pages: int, host_memory_pages: int,
                    sliding_min_free: bool = False) -> str | None:
    """None if the new reservation can be guaranteed beside the others, else why not."""
    limits = thresholds(host_memory_pages, sliding_min_free)
    available = host_memory_pages - limits.high
    total = sum(reservations_pages) + new_reservation_pages
    if total > available:
        return (f"reservations would total {total // PAGES_PER_MIB} MiB but only {available // PAGES_PER_MIB} MiB "
                f"can be guaranteed (host memory minus minFree)")
    return None
