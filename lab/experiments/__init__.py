"""The paper's experiments on real guests (`balloonctl experiment ...`), one module each:

    idle_tax    Fig. 7: the idle memory tax moves memory from an idle guest to an active one
    overhead    Fig. 2: a guest ballooned down to X against one configured with X
    versus      balloon vs blind host swap vs a lowered limit, on a guest with a hot and a cold set
    estimator   the working-set estimator's step response (pure, no guests)
    common      hostd's configuration for a run, CSV output, means

Each run writes a CSV of every sample, a PNG and prints a table. The pure parts (lab files,
summaries, tables) are separate from the run loops, which drive a real lab (lab/runner.py).
"""

from __future__ import annotations

from lab.experiments.common import (
    MiB,
    Progress,
    hostd_toml,
    json_list,
    lab_cgroups,
    mean_known,
    write_csv,
)
from lab.experiments.estimator import (
    ESTIMATOR_FIELDS,
    EstimatorSample,
    EstimatorSetup,
    EstimatorSummary,
    estimator_response,
    render_estimator_table,
    run_estimator,
    summarize_estimator,
    true_touched,
)
from lab.experiments.idle_tax import (
    CSV_FIELDS,
    PAPER_ALLOC_MB,
    PAPER_THROUGHPUT_GAIN,
    IdleTaxSetup,
    PhaseSummary,
    Sample,
    cpu_adjusted_gain,
    host_cpu_ratio,
    host_swap_bytes,
    idle_tax_lab,
    render_idle_tax_table,
    run_idle_tax,
    samples_from_snapshot,
    summarize,
    throughput_gain,
)
from lab.experiments.overhead import (
    OVERHEAD_FIELDS,
    OverheadPoint,
    OverheadSetup,
    overhead_lab,
    render_overhead_table,
    run_balloon_overhead,
)
from lab.experiments.versus import (
    SWAP_FIELDS,
    BalloonVsSwapSetup,
    SwapSample,
    SwapSummary,
    balloon_held_bytes,
    balloon_vs_swap_lab,
    render_swap_table,
    run_balloon_vs_swap,
    summarize_swap,
    swap_case_plan,
)

__all__ = [
    "CSV_FIELDS",
    "ESTIMATOR_FIELDS",
    "OVERHEAD_FIELDS",
    "PAPER_ALLOC_MB",
    "PAPER_THROUGHPUT_GAIN",
    "SWAP_FIELDS",
    "BalloonVsSwapSetup",
    "EstimatorSample",
    "EstimatorSetup",
    "EstimatorSummary",
    "IdleTaxSetup",
    "MiB",
    "OverheadPoint",
    "OverheadSetup",
    "PhaseSummary",
    "Progress",
    "Sample",
    "SwapSample",
    "SwapSummary",
    "balloon_held_bytes",
    "balloon_vs_swap_lab",
    "cpu_adjusted_gain",
    "estimator_response",
    "host_cpu_ratio",
    "host_swap_bytes",
    "hostd_toml",
    "idle_tax_lab",
    "json_list",
    "lab_cgroups",
    "mean_known",
    "overhead_lab",
    "render_estimator_table",
    "render_idle_tax_table",
    "render_overhead_table",
    "render_swap_table",
    "run_balloon_overhead",
    "run_balloon_vs_swap",
    "run_estimator",
    "run_idle_tax",
    "samples_from_snapshot",
    "summarize",
    "summarize_estimator",
    "summarize_swap",
    "swap_case_plan",
    "throughput_gain",
    "true_touched",
    "write_csv",
]
