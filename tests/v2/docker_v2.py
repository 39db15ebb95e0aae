"""Docker in the v2 guest: Debian's docker.io under systemd (the systemd cgroup driver on
cgroup v2), started once for the suite's Docker tests (which run last) and stopped after."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.conftest import require, require_root
from tests.e2e.compose import OFFLINE_BASE_IMAGE
from tests.v2.v2 import require_v2, wait

# Both in the VM image already (scripts/vm/guest/balloonlab-v2-provision, at build time):
# busybox-static alone, and the guest's own root as the compose lab's offline base image.
IMAGE = "balloonlab-v2-busybox:latest"
BASE_IMAGE = OFFLINE_BASE_IMAGE


def docker(*args: str, timeout_s: float = 120, check: bool = True) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout_s)
    if check:
        assert result.returncode == 0, f"docker {' '.join(args)}: {result.stderr}"
    return result.stdout.strip()


@pytest.fixture(scope="session")
def engine() -> Iterator[float]:
    """dockerd started by systemd (the image leaves it disabled at boot); yields its start time."""
    require_root()
    require_v2()
    require(shutil.which("docker") is not None and shutil.which("systemctl") is not None,
            "needs docker.io and systemd in the guest")
    started = time.monotonic()
    subprocess.run(["systemctl", "start", "docker.service"], check=True, timeout=300)
    wait(lambda: subprocess.run(["docker", "info"], capture_output=True).returncode == 0, 300, "dockerd", 1)
    ready = time.monotonic() - started
    stale = docker("ps", "-aq", "--filter", "label=balloonlab.v2=1").split()
    if stale:
        docker("rm", "-f", *stale)
    for image in (IMAGE, BASE_IMAGE):  # imported once, at image build time
        assert subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0, \
            f"{image} is missing: scripts/vm/guest/balloonlab-v2-provision imports it when the VM image is built"
    yield ready
    # The Docker tests run last (conftest): the VM shuts down without dockerd in the way.
    subprocess.run(["systemctl", "stop", "docker.service", "docker.socket", "containerd.service"], timeout=300)
