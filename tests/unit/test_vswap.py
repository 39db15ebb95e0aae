"""Host swap and blocking decisions (hostd/vswap.py): tables, then properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostd.vswap import FLOOR_MARGIN_PAGES, BlockInput, LimitInput, block_decision, next_limit, swap_due

MIB_PAGES = 256  # pages per MiB
STEP = 64 * MIB_PAGES


def limit_input(**overrides):
    fields = dict(memsz_pages=512 * MIB_PAGES, applied_limit_pages=None, usage_pages=400 * MIB_PAGES, balloon_pages=0,
                  reservation_pages=0, swap_target_pages=200 * MIB_PAGES, swap_due=True)
    fields.update(overrides)
    return LimitInput(**fields)


@pytest.mark.parametrize(("state", "agent_usable", "due"), [
    ("high", False, False), ("soft", True, False), ("soft", False, True), ("hard", True, True), ("low", True, True),
])
def test_host_swap_is_due_by_state(state, agent_usable, due):
    assert swap_due(state, agent_usable) is due


@pytest.mark.parametrize(("overrides", "limit"), [
    ({}, 336 * MIB_PAGES),  # one step below what the cgroup holds (400), not straight to the goal (312)
    ({"applied_limit_pages": 336 * MIB_PAGES, "usage_pages": 336 * MIB_PAGES}, 312 * MIB_PAGES),  # the goal: 512 − 200
    ({"applied_limit_pages": 312 * MIB_PAGES, "usage_pages": 312 * MIB_PAGES}, 312 * MIB_PAGES),  # there: hold
    ({"usage_pages": 100 * MIB_PAGES}, 312 * MIB_PAGES),  # holds less than the goal already: straight to it
    ({"reservation_pages": 400 * MIB_PAGES}, 400 * MIB_PAGES + FLOOR_MARGIN_PAGES),  # never below the reservation
    # pinned pages cannot be swapped
    ({"balloon_pages": 350 * MIB_PAGES, "usage_pages": 450 * MIB_PAGES}, 386 * MIB_PAGES),
    # target fell: up a step
    ({"applied_limit_pages": 200 * MIB_PAGES, "usage_pages": 200 * MIB_PAGES}, 264 * MIB_PAGES),
    ({"swap_due": False}, None),  # nothing lowered, nothing due
    ({"swap_target_pages": 0}, None),
    ({"swap_due": False, "applied_limit_pages": 300 * MIB_PAGES}, 364 * MIB_PAGES),  # eased: back up a step at a time
    ({"swap_due": False, "applied_limit_pages": 480 * MIB_PAGES}, None),  # the last step restores the original
    # eased, but given back only out of what the host can spare above its high threshold:
    ({"swap_due": False, "applied_limit_pages": 300 * MIB_PAGES, "spare_pages": 10 * MIB_PAGES}, 310 * MIB_PAGES),
    ({"swap_due": False, "applied_limit_pages": 300 * MIB_PAGES, "spare_pages": 0}, 300 * MIB_PAGES),  # held
    ({"swap_due": False, "applied_limit_pages": 300 * MIB_PAGES, "spare_pages": 1 << 30}, 364 * MIB_PAGES),  # a step
    ({"swap_due": False, "applied_limit_pages": 500 * MIB_PAGES, "spare_pages": 12 * MIB_PAGES}, None),  # restored
    ({"swap_due": False, "spare_pages": 0}, None),  # nothing lowered: nothing to hold
    # ...but up to its allocation target whatever the spare (τ raised its grant), a step at a time
    ({"swap_due": False, "applied_limit_pages": 300 * MIB_PAGES, "spare_pages": 0, "grant_pages": 340 * MIB_PAGES},
     340 * MIB_PAGES),
    ({"swap_due": False, "applied_limit_pages": 300 * MIB_PAGES, "spare_pages": 0, "grant_pages": 600 * MIB_PAGES},
     364 * MIB_PAGES),
    ({"swap_due": False, "applied_limit_pages": 300 * MIB_PAGES, "spare_pages": 8 * MIB_PAGES,
      "grant_pages": 200 * MIB_PAGES}, 308 * MIB_PAGES),  # granted less than it has: the spare only
    # a target that fell is followed whatever the spare: the policy gave the vm more
    ({"applied_limit_pages": 200 * MIB_PAGES, "usage_pages": 200 * MIB_PAGES, "spare_pages": 0}, 264 * MIB_PAGES),
])
def test_limit_steps(overrides, limit):
    assert next_limit(limit_input(**overrides), STEP).limit_pages == limit


@given(memsz=st.integers(64, 1 << 20), applied=st.one_of(st.none(), st.integers(0, 1 << 20)),
       usage=st.integers(0, 1 << 20), balloon=st.integers(0, 1 << 20), reservation=st.integers(0, 1 << 20),
       target=st.integers(0, 1 << 20), due=st.booleans(), step=st.integers(1, 1 << 16))
def test_limit_is_bounded_and_moves_at_most_a_step(memsz, applied, usage, balloon, reservation, target, due, step):
    if applied is not None:
        applied = min(applied, memsz)
    balloon, reservation = min(balloon, memsz), min(reservation, memsz)
    inp = LimitInput(memsz, applied, usage, balloon, reservation, target, due)
    limit = next_limit(inp, step).limit_pages
    if limit is None:
        return  # the cgroup's own limit
    floor = min(memsz, reservation + balloon + FLOOR_MARGIN_PAGES)
    assert floor <= limit <= memsz  # never below the reservation + pinned balloon, never above its own
    current = memsz if applied is None else applied
    if limit > current:
        assert limit - current <= step or limit == floor  # up a step at a time (or at once to a raised floor)
    if limit < current and limit > max(floor, memsz - target):
        assert min(current, usage) - limit <= step  # down a step below what it holds, unless at the goal


@pytest.mark.parametrize(("state", "above", "frozen_since", "cooldown", "now", "frozen"), [
    ("low", True, None, 0, 1_000, True),  # low and above target: block
    ("low", False, None, 0, 1_000, False),  # at or below target: never blocked
    ("hard", True, None, 0, 1_000, False),  # only in the low state
    ("low", True, 1_000, 0, 5_000, True),  # still low, within the bound: stays blocked
    ("hard", True, 1_000, 0, 2_000, False),  # free memory back past hard: thawed
    ("low", True, 1_000, 0, 11_000, False),  # the bound (10 s) reached: thawed even in low
    ("low", True, None, 21_000, 15_000, False),  # and not blocked again during the cool-down
])
def test_blocking(state, above, frozen_since, cooldown, now, frozen):
    decision, _reason = block_decision(BlockInput(state, above, frozen_since, cooldown), now, 10_000)
    assert decision is frozen
