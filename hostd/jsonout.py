"""Strict JSON for everything hostd and the lab write: status documents, `/status.json`, the
dashboard's event stream, the event log and the timeline.

Python's `json.dumps` writes `NaN`, `Infinity` and `-Infinity` by default, and none of them is
JSON: `JSON.parse`, `jq` and every strict parser refuse the whole document. One ρ of ∞ (a vm
allocated 0 pages) used to break the dashboard's stream this way (review S15). Here a
non-finite float becomes `null` ("unknown"), and the encoder runs with `allow_nan=False`, so a
non-finite number can never reach the output.

The common case costs nothing extra: the document is encoded at once by the C encoder and only
walked (`sanitize`) when that refuses a non-finite float. Integers are left as they are: any
size is valid JSON (RFC 8259), though JavaScript reads those beyond 2⁵³ approximately."""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["dumps", "dumps_bytes", "sanitize"]


def sanitize(value: Any) -> Any:
    """`value` with every non-finite float (nested in dicts, lists and tuples) replaced by None;
    tuples become lists. Other values are returned as they are."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {sanitize(key): sanitize(item) for key, item in value.items()}  # a NaN key → "null"
    if isinstance(value, list | tuple):
        return [sanitize(item) for item in value]
    return value


def dumps(value: Any, *, indent: int | None = None, sort_keys: bool = False) -> str:
    """`value` as strict JSON text: compact unless `indent` is given, ASCII only, with every
    non-finite float written as null. Raises TypeError for what json cannot encode."""
    separators = (",", ":") if indent is None else (",", ": ")
    try:
        return json.dumps(value, allow_nan=False, indent=indent, sort_keys=sort_keys, separators=separators)
    except ValueError as exc:
        if "ircular" in str(exc):
            raise
        # allow_nan=False refused a NaN or an infinity: the rare slow path
        return json.dumps(sanitize(value), allow_nan=False, indent=indent, sort_keys=sort_keys,
                          separators=separators)


def dumps_bytes(value: Any) -> bytes:
    """`dumps(value)` encoded (ASCII, so also UTF-8): a body for the HTTP port."""
    return dumps(value).encode("ascii")
