"""hostd's bulk check of a status's stats (agent_plane.checked_stats) keeps exactly what the
value-by-value `checked_stat` keeps, for every list, honest or not."""

import math

from hypothesis import given
from hypothesis import strategies as st

from hostd.agent_plane import MAX_STAT_VALUE, checked_stat, checked_stats

EDGES = [None, 0, 1, -1, MAX_STAT_VALUE, MAX_STAT_VALUE + 1, 2**64, 10**400, True, False,
         0.0, -0.0, 0.5, -0.5, float(MAX_STAT_VALUE), float(MAX_STAT_VALUE) * 2, 1e308,
         math.nan, math.inf, -math.inf]

values = st.one_of(st.sampled_from(EDGES), st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                   st.floats(allow_nan=True, allow_infinity=True))


def _same(a: tuple, b: tuple) -> bool:
    def one(x: object, y: object) -> bool:
        if x is None or y is None:
            return x is y
        if type(x) is not type(y):
            return False
        if isinstance(x, float):
            return x == y and math.copysign(1.0, x) == math.copysign(1.0, y)  # type: ignore[arg-type]
        return x == y

    return len(a) == len(b) and all(one(x, y) for x, y in zip(a, b, strict=True))


@given(st.lists(values, max_size=40))
def test_bulk_check_equals_one_by_one(stats: list) -> None:
    as_tuple = tuple(stats)
    assert _same(checked_stats(as_tuple), tuple(checked_stat(v) for v in as_tuple))


def test_an_honest_list_is_kept_as_it_is() -> None:
    honest = (0, 12, None, 0.25, MAX_STAT_VALUE, 3.0)
    assert checked_stats(honest) == honest


def test_one_bad_value_is_unknown_and_the_rest_kept() -> None:
    assert _same(checked_stats((1, math.nan, 2.5, -3, True, None)), (1, None, 2.5, None, None, None))
    assert _same(checked_stats((10**400, 1.0)), (None, 1.0))  # too large for a float beside one
    assert checked_stats(()) == ()
