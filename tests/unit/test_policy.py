import math

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from hostd.policy import (
    EwmaGains,
    HostInput,
    Thresholds,
    VmInput,
    WorkingSet,
    admission_check,
    allocate,
    balloon_max_pages,
    compute_targets,
    next_state,
    resolve_shares,
    thresholds,
)
from tests.conftest import hypothesis_examples

MIB_PAGES = 256  # pages per MiB


@pytest.mark.parametrize(("tau", "idle_mib", "active_mib"), [(0.0, 180, 180), (0.75, 108.75, 251.25)])
def test_paper_fig7(tau, idle_mib, active_mib):
    """Two vms, equal shares, memsz 256 MiB, 360 MiB available, ~10 vs ~200 MiB active."""
    result = allocate([2560, 2560], [10 * MIB_PAGES, 200 * MIB_PAGES], [0, 0], [256 * MIB_PAGES] * 2,
                      360 * MIB_PAGES, tau)
    assert result.pages[0] / MIB_PAGES == pytest.approx(idle_mib, abs=0.01)
    assert result.pages[1] / MIB_PAGES == pytest.approx(active_mib, abs=0.01)
    assert result.rho[0] == pytest.approx(result.rho[1], rel=1e-3)


def test_reservation_honoured():
    result = allocate([1000, 1000], [0, 200 * MIB_PAGES], [150 * MIB_PAGES, 0], [256 * MIB_PAGES] * 2,
                      360 * MIB_PAGES, 0.75)
    assert result.pages[0] == 150 * MIB_PAGES and result.pages[1] == 210 * MIB_PAGES


def test_limit_honoured():
    result = allocate([1000, 1000], [200 * MIB_PAGES] * 2, [0, 0], [100 * MIB_PAGES, 256 * MIB_PAGES],
                      360 * MIB_PAGES, 0.0)
    assert result.pages[0] == 100 * MIB_PAGES and result.pages[1] == 256 * MIB_PAGES - 0  # 260 wanted, capped at 256
    assert result.pages.sum() <= 360 * MIB_PAGES


def test_zero_shares_pinned_at_reservation():
    result = allocate([0, 1000], [200 * MIB_PAGES] * 2, [64 * MIB_PAGES, 0], [256 * MIB_PAGES] * 2,
                      300 * MIB_PAGES, 0.0)
    assert result.pages[0] == 64 * MIB_PAGES and result.pages[1] == 236 * MIB_PAGES


def test_undercommitted_gives_everyone_memsz():
    result = allocate([1, 1], [0, 0], [0, 0], [100, 200], 1000, 0.75)
    assert list(result.pages) == [100, 200]


def test_infeasible_reservations_flagged():
    result = allocate([1, 1], [0, 0], [600, 600], [1000, 1000], 1000, 0.0)
    assert not result.feasible and list(result.pages) == [600, 600]


def test_shares_levels():
    assert resolve_shares("normal", 1024 * MIB_PAGES) == 10240  # 1 GiB normal = 10240 shares
    assert resolve_shares("high", 512 * MIB_PAGES) == 10240
    assert resolve_shares("low", 512 * MIB_PAGES) == 2560
    assert resolve_shares(777, 512 * MIB_PAGES) == 777


vm_strategy = st.tuples(
    st.integers(0, 50_000),  # shares
    st.floats(0, 1),  # active ratio
    st.integers(1, 4096),  # memsz pages
    st.floats(0, 1),  # reservation fraction
    st.floats(0, 1),  # limit fraction
)


def _rho(shares, active, pages, k):
    """Shares per taxed page (the test's own formula, not the policy's)."""
    taxed = np.where(pages <= active, pages, active + k * (pages - active))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(taxed > 0, shares / np.where(taxed > 0, taxed, 1.0), np.inf)


@settings(max_examples=hypothesis_examples(300), deadline=None)
@given(st.lists(vm_strategy, min_size=1, max_size=12), st.integers(0, 30_000), st.sampled_from([0.0, 0.5, 0.75, 0.9]))
# The example that failed the old "ρ within 5 %" check about once in 20 runs: the exact solution
# (62.51 and 1198.49 pages) has ρ = λ = 4.167 for both, whole pages give 63 (ρ 3.971) and 1198
# (ρ 4.170), a ratio of 1.050; the other rounding (62, 1199) would be 1.056.
@example(vms=[(0, 0.0, 1, 0.0, 0.0), (0, 0.0, 1, 0.0, 0.0), (0, 0.0, 1, 0.0, 0.0), (411, 0.75, 78, 0.0, 1.0),
              (28890, 0.25, 2245, 0.0, 1.0)], available=1261, tau=0.9)
def test_allocation_properties(vms, available, tau):
    memsz = np.array([v[2] for v in vms])
    shares = np.array([float(v[0]) for v in vms])
    active = np.array([v[1] for v in vms]) * memsz
    reserve = (np.array([v[3] for v in vms]) * memsz * 0.3).astype(int)
    upper = np.maximum(reserve, (np.array([v[4] for v in vms]) * memsz).astype(int))
    result = allocate(shares, active, reserve, upper, available, tau)
    assume(result.feasible)
    pages = result.pages
    assert (pages >= reserve).all() and (pages <= upper).all()
    assert pages.sum() <= available or pages.sum() == upper.sum() <= available
    can_hold = upper[shares > 0].sum() + reserve[shares == 0].sum()
    if can_hold > available:
        assert pages.sum() == available  # overcommitted: every page is handed out
    assert (pages[shares == 0] == reserve[shares == 0]).all() or upper.sum() <= available
    # ρ across vms not at a bound and with shares. The exact (fractional) solution gives each of
    # them ρ = λ = 1/x. Whole pages move each by less than one page from it, but one page above
    # its active pages is k = 1/(1 − τ) taxed pages: at τ 0.9 a vm 10 pages above its active set
    # (taxed ≈ A + 100) moves ρ by ~10 % with one page. So no fixed ratio between their ρs holds
    # (the old check, < 5 % for vms above 50 pages, failed on correct allocations). What holds:
    # λ lies between each such vm's ρ one page above and one page below its allocation.
    free = (pages > reserve) & (pages < upper) & (shares > 0)
    x = result.inverse_lambda
    if free.any() and 0 < x < math.inf:
        k = 1.0 / (1.0 - tau)
        s, a, p = shares[free], active[free], pages[free].astype(np.float64)
        lam = 1.0 / x
        assert (_rho(s, a, p + 1, k) <= lam * (1 + 1e-9)).all()
        assert (_rho(s, a, p - 1, k) >= lam * (1 - 1e-9)).all()


@settings(max_examples=hypothesis_examples(150), deadline=None)
@given(st.integers(1, 20_000), st.integers(1, 20_000), st.floats(0, 1), st.floats(0, 1), st.sampled_from([0.0, 0.75]))
def test_monotone_in_shares_and_activity(s1, s2, f1, f2, tau):
    base = allocate([s1, s2], [f1 * 1000, f2 * 1000], [0, 0], [1000, 1000], 1200, tau)
    more_shares = allocate([s1 * 2, s2], [f1 * 1000, f2 * 1000], [0, 0], [1000, 1000], 1200, tau)
    more_active = allocate([s1, s2], [min(1.0, f1 + 0.2) * 1000, f2 * 1000], [0, 0], [1000, 1000], 1200, tau)
    assert more_shares.pages[0] >= base.pages[0] - 1
    assert more_active.pages[0] >= base.pages[0] - 1


def test_ewma_fast_up_slow_down():
    gains = EwmaGains()
    ws = WorkingSet().with_period(0.1, gains)
    assert ws.ratio == pytest.approx(0.1)
    up = ws.with_period(0.9, gains)
    assert up.ratio == pytest.approx(0.5)  # fast EWMA: half-way in one period
    down = WorkingSet(0.9, 0.9, 0.9, 5).with_period(0.1, gains)
    assert down.ratio == pytest.approx(0.82)  # slow EWMA holds the estimate up
    partial = WorkingSet(0.1, 0.1, 0.1, 3).with_current(0.7, gains)
    assert partial.ratio == pytest.approx(0.4)  # the running period already counts
    assert WorkingSet(0.1, 0.5, 0.5, 3).with_current(0.2, gains).ratio == pytest.approx(0.5)


def test_unknown_working_set_is_fully_active():
    assert WorkingSet().ratio == 1.0


LIMITS = Thresholds(high=600, soft=400, hard=200, low=100)


@pytest.mark.parametrize(
    ("state", "free", "expected"),
    [
        ("high", 700, "high"), ("high", 500, "high"), ("high", 399, "soft"), ("high", 199, "hard"),
        ("high", 99, "low"), ("soft", 500, "soft"), ("soft", 599, "soft"), ("soft", 600, "high"),
        ("hard", 399, "hard"), ("hard", 400, "soft"), ("hard", 650, "high"), ("low", 150, "low"),
        ("low", 200, "hard"), ("low", 450, "soft"), ("soft", 150, "hard"),
    ],
)
def test_state_hysteresis(state, free, expected):
    assert next_state(state, free, LIMITS) == expected


def test_thresholds_paper_and_sliding_scale():
    assert thresholds(100_000) == Thresholds(6000, 4000, 2000, 1000)
    gib = 262_144
    sliding = thresholds(28 * gib, sliding_scale=True)
    assert sliding.high * 4096 / (1 << 20) == pytest.approx(901.12, abs=0.01)  # vSphere 5 minFree at 28 GiB
    assert sliding.soft == int(sliding.high * 0.64)


def _vm(vm_id, **overrides):
    fields = dict(vm_id=vm_id, memsz_pages=256 * MIB_PAGES, shares=2560, reservation_pages=0,
                  limit_pages=256 * MIB_PAGES,
                  maxmemctl_pages=None, active_ratio=0.5, balloon_pages=0, agent_alive=True, agent_refusing=False,
                  manual_balloon_pages=None, balloon_target_pages=0)
    fields.update(overrides)
    return VmInput(**fields)


def test_targets_fig7_in_soft_state():
    host = HostInput(host_memory_pages=383 * MIB_PAGES, idle_tax=0.75)  # 383 − 6 % ≈ 360 MiB for vms
    result = compute_targets(host, [_vm("idle", active_ratio=10 / 256), _vm("busy", active_ratio=200 / 256)], "soft")
    idle, busy = result.decisions
    assert idle.balloon_target_pages > busy.balloon_target_pages
    assert idle.alloc_target_pages + busy.alloc_target_pages == result.available_pages
    assert idle.balloon_target_pages == 256 * MIB_PAGES - idle.alloc_target_pages


def test_balloon_cap_becomes_swap_target():
    host = HostInput(host_memory_pages=200 * MIB_PAGES, ctl_max_percent=65)
    [decision] = compute_targets(host, [_vm("a", active_ratio=0.0, maxmemctl_pages=32 * MIB_PAGES)], "hard").decisions
    assert decision.balloon_target_pages == 32 * MIB_PAGES == decision.balloon_max_pages
    assert decision.swap_target_pages == 256 * MIB_PAGES - decision.alloc_target_pages - 32 * MIB_PAGES
    assert "MCTLMAX" in decision.reason


def test_no_agent_means_swap_and_refusing_guest_too():
    host = HostInput(host_memory_pages=300 * MIB_PAGES)
    absent, refusing = compute_targets(
        host, [_vm("a", agent_alive=False), _vm("b", agent_refusing=True, balloon_pages=10 * MIB_PAGES)], "hard"
    ).decisions
    assert absent.swap_target_pages == 256 * MIB_PAGES - absent.alloc_target_pages
    assert refusing.swap_target_pages == 256 * MIB_PAGES - refusing.alloc_target_pages - 10 * MIB_PAGES


def test_high_state_reclaims_nothing_new_and_manual_wins():
    host = HostInput(host_memory_pages=300 * MIB_PAGES)
    held, manual = compute_targets(
        host, [_vm("a", balloon_target_pages=5 * MIB_PAGES), _vm("b", manual_balloon_pages=100 * MIB_PAGES)], "high"
    ).decisions
    assert held.balloon_target_pages == 5 * MIB_PAGES and held.swap_target_pages == 0
    assert manual.balloon_target_pages == 100 * MIB_PAGES and manual.reason == "manual target"


def test_balloon_max():
    assert balloon_max_pages(1000, 65, None) == 650
    assert balloon_max_pages(1000, 65, 300) == 300
    assert balloon_max_pages(1000, 0, None) == 0


def test_admission():
    assert admission_check([100 * MIB_PAGES], 100 * MIB_PAGES, 1024 * MIB_PAGES) is None
    message = admission_check([500 * MIB_PAGES], 500 * MIB_PAGES, 1024 * MIB_PAGES)
    assert message is not None and "guaranteed" in message
