"""Timelines: every sample and decision of a hostd run as JSON Lines (`--timeline FILE`), and
the reader `balloonctl plot` uses. Pure: records in, records out; the file is the server's.

    {"kind": "sample", "t_s": 12.0, "host": {...}, "vms": {"web": {...}, ...}}
    {"kind": "event", "t_s": 12.3, "event": "target", "vm": "web", ...}

A sample holds, in bytes: the host's free memory and its four thresholds; per vm memsz,
granted, alloc_target, balloon, active and swap (null when unknown)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from hostd.status_doc import StatusDocument

VM_SERIES = ("memsz", "granted", "alloc_target", "balloon", "active", "swap")
_SNAPSHOT_FIELDS = {"memsz": "memsz_bytes", "granted": "granted_bytes", "alloc_target": "alloc_target_bytes",
                    "balloon": "balloon_bytes", "active": "active_bytes", "swap": "swap_current_bytes"}
THRESHOLDS = ("high", "soft", "hard", "low")


class TimelineError(ValueError):
    """A timeline file that cannot be read; the message names the line."""


def sample_record(snapshot: StatusDocument) -> dict[str, Any]:
    host = snapshot["host"]
    return {
        "kind": "sample", "t_s": round(host["uptime_ms"] / 1000, 3),
        "host": {"state": host["state"], "free": host["free_bytes"], "host_memory": host["host_memory_bytes"],
                 **{name: cast(Mapping[str, int], host["thresholds_bytes"])[name] for name in THRESHOLDS}},
        "vms": {vm["vm_id"]: {name: cast(Mapping[str, Any], vm)[key] for name, key in _SNAPSHOT_FIELDS.items()}
                for vm in snapshot["vms"] if vm["alive"]},
    }


def event_record(event: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "event", "t_s": round(event.get("t_ms", 0) / 1000, 3), **event}


@dataclass
class Timeline:
    times_s: list[float] = field(default_factory=list)
    free: list[float] = field(default_factory=list)
    thresholds: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in THRESHOLDS})
    # vm → series → (times, values); a vm may join late or leave early
    vms: dict[str, dict[str, tuple[list[float], list[float]]]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)


def read_timeline(lines: Iterable[str], source: str = "timeline") -> Timeline:
    timeline = Timeline()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            kind = record["kind"]
            t_s = float(record["t_s"])
        except (ValueError, KeyError, TypeError) as exc:
            raise TimelineError(f"{source}:{number}: not a timeline record ({exc})") from None
        if kind == "event":
            timeline.events.append(record)
            continue
        if kind != "sample":
            continue  # kinds from newer versions are skipped, not fatal
        try:
            host = record["host"]
            timeline.free.append(float(host["free"]))
            for name in THRESHOLDS:
                timeline.thresholds[name].append(float(host[name]))
            timeline.times_s.append(t_s)
            for vm_id, values in record["vms"].items():
                series = timeline.vms.setdefault(vm_id, {name: ([], []) for name in VM_SERIES})
                for name in VM_SERIES:
                    if values.get(name) is not None:
                        series[name][0].append(t_s)
                        series[name][1].append(float(values[name]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise TimelineError(f"{source}:{number}: malformed sample ({exc!r})") from None
    if not timeline.times_s:
        raise TimelineError(f"{source}: no samples (was hostd started with --timeline?)")
    return timeline
