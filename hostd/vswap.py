"""Host-level reclamation decisions (SPEC §3.4, §3.8), pure: what memory limit to give a vm's
cgroup so the kernel swaps it out without the guest's help (vSwap), and whether to freeze
it (blocking in the low state). `hostd.core` calls these with each vm's figures; the server
carries the results out through a host backend (hostd/cgroupfs.py).

A swap target is applied only where the policy says host swap is due: in the hard and low
states, and in soft where ballooning is impossible (no agent, or the guest refuses). The
limit goes down at most `step_pages` below what the cgroup holds per balance step, never
below the vm's floor (its reservation plus the balloon's pinned pages, which cannot be
swapped, plus a small working margin), and comes back up `step_pages` at a time once the
target falls, until the original limit is restored.

Once host swap is no longer due (the host back in the high state, or a balloon that can take
over), a lowered limit comes back a step at a time up to what the policy grants the vm
(`grant_pages`, its allocation target), and above that only out of the memory the host can
spare above its high threshold (`spare_pages`). Giving it all back at once let the guest
refault what was swapped, the host fell straight back into the hard state, and the limit went
down again: a flap every second in the Fig. 7 experiment at τ = 0 (ESX's "back up only after
significantly exceeding the higher threshold", §6.3).
"""

from __future__ import annotations

from dataclasses import dataclass

from hostd.policy import State
from protocol.limits import PAGES_PER_MIB

FLOOR_MARGIN_PAGES = 16 * PAGES_PER_MIB  # never squeeze a guest below its pinned pages + this


@dataclass(frozen=True, slots=True)
class LimitInput:
    memsz_pages: int  # the cgroup's own limit before hostd touched it (or the vm's memsz)
    applied_limit_pages: int | None  # the limit hostd has set now; None = the original is in force
    usage_pages: int  # what the cgroup holds now (balloon included: its pages are the guest's)
    balloon_pages: int  # pinned by the agent: resident, unswappable
    reservation_pages: int
    swap_target_pages: int  # SWTGT from the policy
    swap_due: bool  # the state (and the agent's absence or refusal) says host swap applies now
    spare_pages: int | None = None  # free host memory above the high threshold (None: not limited by it)
    grant_pages: int | None = None  # the vm's allocation target: given back up to it whatever the spare


@dataclass(frozen=True, slots=True)
class LimitDecision:
    limit_pages: int | None  # None = restore the original limit
    reason: str


def swap_due(state: State, agent_usable: bool) -> bool:
    """Paper / SPEC §3.3: soft balloons only (host swap only where ballooning cannot),
    hard and low swap as well."""
    return state in ("hard", "low") or (state == "soft" and not agent_usable)


def floor_pages(inp: LimitInput) -> int:
    return min(inp.memsz_pages, inp.reservation_pages + inp.balloon_pages + FLOOR_MARGIN_PAGES)


def next_limit(inp: LimitInput, step_pages: int) -> LimitDecision:
    """The limit for the next step toward the swap target (or back to the original)."""
    floor = floor_pages(inp)
    current = inp.memsz_pages if inp.applied_limit_pages is None else inp.applied_limit_pages
    if inp.swap_due and inp.swap_target_pages > 0:
        goal = max(floor, inp.memsz_pages - inp.swap_target_pages)
        if goal < current:
            # Step down from what the cgroup really holds: a limit far below usage makes the
            # kernel reclaim (or, on v2, OOM-kill) all at once.
            start = min(current, max(inp.usage_pages, goal))
            limit = max(goal, start - step_pages)
            return LimitDecision(limit, f"swap target {inp.swap_target_pages} pages: limit → {limit} pages"
                                 + (" (reservation floor)" if goal == floor and goal > inp.memsz_pages
                                    - inp.swap_target_pages else ""))
        if goal == current:
            return LimitDecision(current if inp.applied_limit_pages is not None else None, "at the swap target")
        limit = max(floor, min(goal, current + step_pages))  # a reservation raised since: at once
        return LimitDecision(limit, f"swap target fell: limit → {limit} pages")
    if inp.applied_limit_pages is None:
        return LimitDecision(None, "no host swap due")
    limit = max(floor, current + step_pages)
    if inp.spare_pages is not None:
        top = max(current + max(0, inp.spare_pages), inp.grant_pages or 0)
        limit = max(floor, current, min(limit, top))
        if limit == current:
            return LimitDecision(current, "no host swap due, but nothing to spare above the high threshold "
                                          "beyond the vm's allocation: limit held")
    if limit >= inp.memsz_pages:
        return LimitDecision(None, "pressure eased: original limit restored")
    return LimitDecision(limit, f"pressure eased: limit → {limit} pages")


@dataclass(frozen=True, slots=True)
class BlockInput:
    state: State
    above_target: bool  # the vm holds more than the policy grants it, and host swap is working on it
    frozen_since_ms: int | None
    cooldown_until_ms: int  # after a block ran its full length, no new one before this


def block_decision(inp: BlockInput, now_ms: int, block_max_ms: int) -> tuple[bool, str]:
    """(frozen, reason). ESX blocks vms above target in the low state until free memory is
    back past the hard threshold; here a block also ends after `block_max_ms`, and the vm is
    not frozen again for as long, so a guest is never stopped for good."""
    if inp.frozen_since_ms is not None:
        if inp.state != "low":
            return False, f"free memory recovered ({inp.state}): thawed"
        if now_ms - inp.frozen_since_ms >= block_max_ms:
            return False, f"blocked for {block_max_ms} ms (the bound): thawed"
        return True, "low state: blocked"
    if inp.state == "low" and inp.above_target and now_ms >= inp.cooldown_until_ms:
        return True, "low state, above target: blocked"
    return False, ""
