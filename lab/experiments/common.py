"""What every experiment shares: hostd's configuration for a run, where the lab puts its
guests, means of samples that may be missing, CSV output."""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lab.runner import LabOptions

MiB = 1 << 20
Progress = Callable[[str], None]


def hostd_toml(host_memory_bytes: int, idle_tax: float, sample_period_s: float, balance_period_s: float,
               cgroups: dict[str, str] | None = None, vswap_mode: str = "limit",
               vswap_state_file: Path | None = None) -> str:
    """hostd for an experiment; with `cgroups` (vm → cgroup path below the hierarchy) hostd
    applies swap targets to those guests (host swap, `vswap_mode`)."""
    text = (f'host_memory_bytes = "{host_memory_bytes >> 20}MiB"\nidle_tax_ratio = {idle_tax}\n'
            f'sample_period_ms = "{sample_period_s:g}s"\nbalance_period_ms = "{balance_period_s:g}s"\n'
            'report_interval_ms = "1s"\nhttp_address = "off"\n')
    if not cgroups:
        return text + "vswap = false\n"
    text += f'vswap = true\nvswap_mode = "{vswap_mode}"\n'
    if vswap_state_file is not None:
        text += f'vswap_state_file = "{vswap_state_file}"\n'
    return text + "".join(f'\n[vms.{vm}]\ncgroup = "{path}"\n' for vm, path in cgroups.items())


def lab_cgroups(options: LabOptions, guests: Sequence[str]) -> dict[str, str]:
    """Where lab/runner.py puts each guest: below the lab's parent, relative to the hierarchy."""
    return {guest: f"{options.cgroup_name}/{guest}" for guest in guests}


def mean_known(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.mean(known) if known else None


def write_csv(path: Path, rows: Sequence[Any], fields: Sequence[str]) -> None:
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(fields)
        for row in rows:
            writer.writerow([getattr(row, name) for name in fields])


def json_list(words: Sequence[str]) -> str:
    return json.dumps(list(words))
