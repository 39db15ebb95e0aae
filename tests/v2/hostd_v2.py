"""hostd as a real process in the v2 guest: the integration tests' HostdProcess with every
wait stretched for TCG (python starts and runs 15–30× slower there)."""

from __future__ import annotations

from typing import Any

from tests.integration.hostd_proc import HostdProcess

TCG_MIN_WAIT_S = 120.0


class SlowHostd(HostdProcess):
    def wait_until(self, predicate, timeout_s: float, what: str) -> dict[str, Any]:
        return super().wait_until(predicate, max(timeout_s, TCG_MIN_WAIT_S), what)
