"""balloonlab: test your service under memory ballooning.

    from balloonlab import Lab, MiB

    with Lab(host_memory="1GiB") as lab:
        web = lab.guest("web", command=["python3", "-m", "http.server", "8080"], memory="256MiB")
        lab.watch()
        result = web.squeeze(to="128MiB")
        assert web.facts().oom_kills == 0

The stable names are those in `__all__`: the hostd client (`HostdClient`,
`ControlCredentials`, `CtlError`), `Lab` and its `Guest` handles with their `Facts`, the
`Timeline`, the measurement and assertion helpers, and the pytest plugin's fixtures
(`balloon_host`, `balloon_guest`; see balloonlab.pytest_plugin). Needs Linux, root and swap.
"""

from __future__ import annotations

from balloonlab.guest import Facts, Guest, Squeeze
from balloonlab.host import lab_unavailable_reason
from balloonlab.lab import Lab, LabError
from balloonlab.measure import (
    BalloonAssertionError,
    Measurement,
    assert_answering,
    assert_latency_within,
    assert_no_oom_kills,
    assert_throughput_within,
    measure,
)
from balloonlab.timeline import Event, Sample, Timeline
from hostd.client import ControlCredentials, CtlError, HostdClient

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

__all__ = [
    "BalloonAssertionError",
    "ControlCredentials",
    "CtlError",
    "Event",
    "Facts",
    "GiB",
    "Guest",
    "HostdClient",
    "KiB",
    "Lab",
    "LabError",
    "Measurement",
    "MiB",
    "Sample",
    "Squeeze",
    "Timeline",
    "assert_answering",
    "assert_latency_within",
    "assert_no_oom_kills",
    "assert_throughput_within",
    "lab_unavailable_reason",
    "measure",
]
