"""Parsing and printing of sizes and durations for humans (CLI, config, env).

Sizes: an integer with an optional binary unit — B, KiB, MiB, GiB, TiB (K/M/G/T and KB/MB/GB
are accepted as the same binary units; memory is counted in powers of two). A plain number
means bytes. Durations: a number with ms, s, m or h; a plain number means milliseconds.
"""

from __future__ import annotations

import re

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B?)\s*", re.IGNORECASE)
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", re.IGNORECASE)
_SIZE_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}
_DURATION_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}


def parse_size_bytes(text: str) -> int:
    """'512MiB' → 536870912. Raises ValueError with a readable message."""
    match = _SIZE.fullmatch(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size (examples: 4096, 512MiB, 2GiB)")
    number, prefix, _suffix = match.groups()
    value = float(number) * (1 << _SIZE_SHIFT[prefix.upper()])
    if value != int(value):
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(value)


def parse_duration_ms(text: str) -> int:
    """'1.5s' → 1500; '250' → 250 (ms)."""
    match = _DURATION.fullmatch(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a duration (examples: 250ms, 15s, 1m)")
    number, unit = match.groups()
    return round(float(number) * _DURATION_MS[(unit or "ms").lower()])


def parse_bool(text: str) -> bool:
    """true/false, yes/no, on/off, 1/0 (any case)."""
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (true/false)")


def format_bytes(value: int | None, unit: str = "MiB") -> str:
    if value is None:
        return "-"
    shift = {"KiB": 10, "MiB": 20, "GiB": 30}[unit]
    return f"{value / (1 << shift):.1f}{unit}" if unit == "GiB" else f"{value >> shift}{unit}"
