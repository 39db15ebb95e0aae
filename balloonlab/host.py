"""What this host offers a lab: whether one can run here (root, swap, a memory cgroup
controller), free loopback ports for hostd, and the children's tie to the lab's process."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import socket

from cgroups import host_swap_total_bytes
from lab import cgroups

_PR_SET_PDEATHSIG = 1


def lab_unavailable_reason() -> str | None:
    """Why a Lab cannot run here (not root, no swap, no memory cgroup), or None."""
    if os.geteuid() != 0:
        return "balloonlab needs root (memory cgroups, mlock of the balloon)"
    if host_swap_total_bytes() == 0:
        return "balloonlab needs swap enabled on the host (ballooned guests page out to swap; swapon)"
    try:
        cgroups.memory_cgroup_version()
    except cgroups.CgroupSetupError as exc:
        return f"balloonlab needs a memory cgroup controller: {exc}"
    return None


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now (hostd's endpoints, its HTTP port).

    Chosen at random below the kernel's ephemeral range (net.ipv4.ip_local_port_range), not by
    binding port 0: a port the kernel hands out as "free" comes from that range, which is also
    where every outgoing connection takes its source port, so between the probe and hostd's
    bind a busy host (thousands of simulated agents connecting) took it ("Address already in
    use", seen in a bench and a fault test)."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(10_000, low) if low > 10_100 else 0
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(probe.getsockname()[1])
    raise OSError("no free loopback port below the ephemeral range after 200 tries")


def _ephemeral_low(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> int:
    try:
        with open(path) as text:
            return int(text.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def die_with_parent() -> None:
    """In the child before exec: SIGTERM when the lab's process dies, however it dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
