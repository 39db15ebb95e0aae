"""The working-set estimator's response (pure): hostd's EWMAs fed a step up and a step down
of the true touched fraction, with the sample period as the parameter."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lab.experiments.common import write_csv


# ---- the working-set estimator's response (pure) ------------------------------------------------
@dataclass(frozen=True, slots=True)
class EstimatorSetup:
    """A workload whose true touched fraction steps from `low` to `high` and back; hostd's
    estimator (hostd.policy.WorkingSet) fed as hostd feeds it: each completed sampling period
    (with_period) and, every report in between, the running period's partial count
    (with_current). The workload touches its whole set within a second, so a partial count
    is the true fraction at once."""

    sample_periods_s: tuple[float, ...] = (5.0, 15.0, 60.0)
    low: float = 0.2
    high: float = 0.8
    step_up_s: float = 300.0
    step_down_s: float = 900.0
    end_s: float = 2700.0
    report_s: float = 1.0


@dataclass(frozen=True, slots=True)
class EstimatorSample:
    sample_period_s: float
    t_s: float
    true_ratio: float
    slow: float
    fast: float
    fast_current: float
    estimate: float


ESTIMATOR_FIELDS = ("sample_period_s", "t_s", "true_ratio", "slow", "fast", "fast_current", "estimate")


def true_touched(setup: EstimatorSetup, t_s: float) -> float:
    return setup.high if setup.step_up_s <= t_s < setup.step_down_s else setup.low


def estimator_response(setup: EstimatorSetup) -> list[EstimatorSample]:
    from hostd.policy import EwmaGains, WorkingSet

    gains = EwmaGains()
    out: list[EstimatorSample] = []
    for period in setup.sample_periods_s:
        ws = WorkingSet()
        period_start = 0.0
        peak = 0.0  # the period's touched fraction so far: what its pages' access bits show
        steps = round(setup.end_s / setup.report_s)
        for index in range(1, steps + 1):
            t = index * setup.report_s
            peak = max(peak, true_touched(setup, t - setup.report_s / 2))
            if t - period_start >= period - 1e-9:
                ws = ws.with_period(peak, gains)
                period_start, peak = t, 0.0
            elif ws.samples:
                ws = ws.with_current(peak, gains)
            out.append(EstimatorSample(period, t, true_touched(setup, t), ws.slow, ws.fast, ws.fast_current,
                                       ws.ratio))
    return out


@dataclass(frozen=True, slots=True)
class EstimatorSummary:
    sample_period_s: float
    up_90_s: float | None  # after the step up: until the estimate reaches 90 % of the way
    down_90_s: float | None  # after the step down: until it has come 90 % of the way down


def summarize_estimator(samples: Sequence[EstimatorSample], setup: EstimatorSetup) -> list[EstimatorSummary]:
    out = []
    span = setup.high - setup.low
    for period in dict.fromkeys(s.sample_period_s for s in samples):
        rows = [s for s in samples if s.sample_period_s == period]
        up = next((s.t_s - setup.step_up_s for s in rows
                   if setup.step_up_s <= s.t_s and s.estimate >= setup.low + 0.9 * span), None)
        down = next((s.t_s - setup.step_down_s for s in rows
                     if s.t_s >= setup.step_down_s and s.estimate <= setup.high - 0.9 * span), None)
        out.append(EstimatorSummary(period, up, down))
    return out


def render_estimator_table(summaries: Sequence[EstimatorSummary]) -> str:
    lines = [f"{'SAMPLE PERIOD':>13} {'UP 90 %':>9} {'(PERIODS)':>9} {'DOWN 90 %':>10} {'(PERIODS)':>9}"]
    def cell(value: float | None, period: float) -> tuple[str, str]:
        return (f"{value:.0f}s", f"{value / period:.1f}") if value is not None else ("never", "-")

    for s in summaries:
        up, down = cell(s.up_90_s, s.sample_period_s), cell(s.down_90_s, s.sample_period_s)
        lines.append(f"{s.sample_period_s:>12g}s {up[0]:>9} {up[1]:>9} {down[0]:>10} {down[1]:>9}")
    return "\n".join(lines)


def run_estimator(setup: EstimatorSetup, out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = estimator_response(setup)
    write_csv(out_dir / "wss-estimator.csv", samples, ESTIMATOR_FIELDS)
    from lab.plots import plot_estimator

    plot_estimator(samples, out_dir / "wss-estimator.png", setup)
    table = render_estimator_table(summarize_estimator(samples, setup))
    (out_dir / "wss-estimator.txt").write_text(table + "\n")
    return f"{table}\n\nwrote {out_dir / 'wss-estimator.csv'}, {out_dir / 'wss-estimator.png'}"
