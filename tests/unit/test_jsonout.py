"""Strict JSON out (hostd.jsonout): a non-finite number becomes null, and nothing that is not
JSON is ever written (review S15)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostd.jsonout import dumps, dumps_bytes, sanitize


def strict_loads(text: str | bytes) -> Any:
    """json.loads that refuses NaN, Infinity and -Infinity as a strict parser (JSON.parse, jq) does."""
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_floats_nested_anywhere_become_null():
    snapshot = {"host": {"free_bytes": -5, "rho": float("inf")},
                "vms": [{"vm_id": "web", "rho": float("inf"), "active_ratio": float("nan")},
                        {"vm_id": "db", "rho": -math.inf, "series": (1.5, float("nan"), [math.inf])}]}
    text = dumps(snapshot)
    assert strict_loads(text) == {
        "host": {"free_bytes": -5, "rho": None},
        "vms": [{"vm_id": "web", "rho": None, "active_ratio": None},
                {"vm_id": "db", "rho": None, "series": [1.5, None, [None]]}]}
    assert "Infinity" not in text and "NaN" not in text


def test_finite_documents_are_what_json_writes_compactly():
    document = {"a": [1, 2.5, None, True, "ü\n"], "b": {"c": 2 ** 64 - 1}}
    assert dumps(document) == json.dumps(document, separators=(",", ":"))
    assert dumps_bytes(document) == dumps(document).encode()
    assert dumps(document, indent=2) == json.dumps(document, indent=2)
    assert dumps({"b": 1, "a": 2}, sort_keys=True) == '{"a":2,"b":1}'


def test_output_is_ascii_so_characters_are_bytes():
    assert dumps({"vm": "wéb\u202e"}).isascii()


def test_a_non_finite_key_is_written_as_null():
    assert strict_loads(dumps({float("nan"): 1, "x": 2})) == {"null": 1, "x": 2}


def test_sanitize_leaves_other_values_alone():
    assert sanitize({"a": (1, "x", None, 2.0)}) == {"a": [1, "x", None, 2.0]}
    assert sanitize(float("-inf")) is None


def test_what_json_cannot_encode_still_fails_loudly():
    with pytest.raises(TypeError):
        dumps({"a": object()})
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValueError, match="ircular"):
        dumps(loop)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=30)


@given(json_values)
def test_any_document_comes_out_as_strict_json(value):
    strict_loads(dumps(value))
