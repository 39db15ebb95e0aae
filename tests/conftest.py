"""Shared fixtures. `require()` skips with a stated reason on a developer machine but
fails under CI=true, where .ci/run has set up root, swap and Docker: CI never skips."""

from __future__ import annotations

import os
import shutil

import pytest

from balloonlab.host import free_loopback_port  # noqa: F401  (tests import it from here)
from cgroups import host_swap_total_bytes

IN_CI = os.environ.get("CI", "").lower() == "true"

try:  # the v2 guest runs its scenarios with Debian's python3 packages, which have no hypothesis
    from hypothesis import HealthCheck, settings
except ImportError:
    settings = None  # type: ignore[assignment]

# Hypothesis profiles. CI (CI=true) is derandomised: the same examples on every run, so a red
# CI is a regression, not an unlucky draw (random exploration is for developers' runs and the
# long run). `HYPOTHESIS_PROFILE=long` is the long randomised run: ≥ 20,000 examples for every
# property that asks for its count through `hypothesis_examples`. No profile has a deadline:
# a per-example time limit is a timing assertion, and fails on a loaded machine.
if settings is not None:
    settings.register_profile("dev", deadline=None)
    settings.register_profile("ci", derandomize=True, database=None, print_blob=True, deadline=None)
    settings.register_profile("long", max_examples=20_000, deadline=None, database=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile("ci" if IN_CI else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def hypothesis_examples(count: int) -> int:
    """A property's example count: `count`, or the profile's if that is larger (the long run)."""
    assert settings is not None, "hypothesis is not installed"
    return max(count, settings.default.max_examples)


def require(condition: bool, reason: str) -> None:
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI must provide this, but: {reason}")
    pytest.skip(reason)


def require_root() -> None:
    require(os.geteuid() == 0, "needs root (memory cgroups, mlock, swap)")


def require_swap(min_bytes: int = 1 << 30) -> None:
    require(host_swap_total_bytes() >= min_bytes, f"needs ≥ {min_bytes >> 20} MiB of swap enabled (swapon)")


def require_docker() -> None:
    require(shutil.which("docker") is not None and os.path.exists("/var/run/docker.sock"),
            "needs a running Docker engine")


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Configuration comes from BALLOONLAB_* variables: tests start without any."""
    for name in list(os.environ):
        if name.startswith("BALLOONLAB_"):
            monkeypatch.delenv(name)
