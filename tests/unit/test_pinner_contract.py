"""One contract, two pinners: the FakePinner the session tests use must keep the same books as
the real MlockPinner (mmap + mlock; 1 MiB, within the default RLIMIT_MEMLOCK) for any sequence
of pins, releases and drops."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guestagent.balloon import MlockPinner
from guestagent.errors import PinError
from guestagent.pinning import FakePinner, Pinner
from tests.conftest import require

CAPACITY = 256  # pages: 1 MiB

OPS = st.lists(st.one_of(
    st.tuples(st.just("pin"), st.integers(1, 96), st.integers(1, 64)),
    st.tuples(st.just("release"), st.integers(0, 40), st.just(0)),
    st.tuples(st.just("drop"), st.integers(0, 40), st.just(0)),
    st.tuples(st.just("release_last"), st.just(0), st.just(0)),
), max_size=25)


def books(p: Pinner) -> tuple:
    return (p.held_pages, p.dropped_pages, [(b.offset_pages, b.page_count) for b in p.batches],
            [(b.offset_pages, b.page_count) for b in p.batches_from_top()])


def apply(p: Pinner, op: str, a: int, b: int) -> object:
    try:
        if op == "pin":
            return [(x.offset_pages, x.page_count) for x in p.pin_batches(a, b)]
        if not p.batches:
            return None
        if op == "release_last":
            return p.release_last().offset_pages
        batch = p.batches[a % len(p.batches)]
        (p.release if op == "release" else p.drop_backing)(batch)
        return p.holds(batch)
    except PinError as exc:
        return ("PinError", exc.args[0] if exc.args else None)


@pytest.fixture(scope="module")
def real_available():
    # Skipped where mlock is not allowed (no root, no CAP_IPC_LOCK, a small RLIMIT_MEMLOCK);
    # under CI=true that is a failure: CI runs as root.
    try:
        p = MlockPinner(CAPACITY, want_pfn=False)
    except PinError as exc:
        require(False, f"cannot map a pinner here: {exc}")
    try:
        p.pin_batches(CAPACITY, CAPACITY)
    except PinError as exc:
        require(False, f"cannot mlock {CAPACITY} pages here: {exc}")
    finally:
        p.close()


@settings(max_examples=40, deadline=None)
@given(ops=OPS)
def test_fake_and_real_pinners_keep_the_same_books(real_available, ops):
    real, fake = MlockPinner(CAPACITY, want_pfn=False), FakePinner(CAPACITY)
    try:
        for op, a, b in ops:
            assert apply(real, op, a, b) == apply(fake, op, a, b), op
            assert books(real) == books(fake)
        assert real.release_all() == fake.release_all() and real.held_pages == fake.held_pages == 0
    finally:
        real.close()
