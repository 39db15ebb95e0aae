"""Docker in the v2 guest: Debian's docker.io under systemd (the systemd cgroup driver on
cgroup v2), started once for the suite's Docker tests (which run last) and stopped after."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.conftest import require, require_root
from tests.v2.v2 import require_v2, wait

IMAGE = "balloonlab-v2-busybox:latest"


def docker(*args: str, timeout_s: float = 120, check: bool = True) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout_s)
    if check:
        assert result.returncode == 0, f"docker {' '.join(args)}: {result.stderr}"
    return result.stdout.strip()


@pytest.fixture(scope="session")
def engine(tmp_path_factory) -> Iterator[float]:
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
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode != 0:
        tree = tmp_path_factory.mktemp("busybox")
        for directory in ("bin", "dev/shm", "proc", "sys", "tmp"):
            (tree / directory).mkdir(parents=True)
        shutil.copy("/bin/busybox", tree / "bin" / "busybox")
        for applet in ("sh", "dd", "sleep", "cat", "rm"):
            (tree / "bin" / applet).symlink_to("busybox")
        tar = subprocess.Popen(["tar", "-C", str(tree), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["docker", "import", "-", IMAGE], stdin=tar.stdout, check=True, capture_output=True,
                       timeout=300)
        assert tar.wait() == 0
        assert tar.stdout is not None
        tar.stdout.close()
    yield ready
    # The Docker tests run last (conftest): the VM shuts down without dockerd in the way.
    subprocess.run(["systemctl", "stop", "docker.service", "docker.socket", "containerd.service"], timeout=300)
