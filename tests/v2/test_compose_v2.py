"""The compose lab in the v2 guest with Compose v2 (`docker compose`, the plugin the host's
scripts/setup-docker.sh installs, handed in by scripts/vm/run.sh) on Docker's systemd cgroup
driver: hostd and three guests come up from the repo's docker-compose.yml, register, and
balloon; `docker compose down` leaves nothing behind. The base image is the guest's own
Debian root (its python3 packages), imported into Docker: no registry, no network."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require, require_swap
from tests.e2e.compose import OFFLINE_BASE_IMAGE, ComposeLab, compose_command, compose_version, wait_for
from tests.v2.docker_v2 import docker
from tests.v2.v2 import ROOT, MiB, mib

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.timeout(1200)]
PLUGIN = Path("/src/.balloonlab-v2-extra/docker-compose")
PLUGINS = Path("/usr/local/lib/docker/cli-plugins")
GUESTS = ("batch", "db", "web")
# The guest's root as a base image: everything but the kernel's modules, Docker itself and the
# per-boot state.
ROOT_EXCLUDES = ("./var/lib/docker", "./var/lib/containerd", "./src", "./tmp", "./run", "./boot", "./lib/modules",
                 "./usr/lib/modules", "./usr/share/doc", "./usr/share/man", "./var/cache", "./usr/local/lib/docker",
                 "./usr/bin/dockerd", "./usr/bin/containerd*", "./usr/bin/docker", "./usr/sbin/runc")
# hostd's healthcheck runs balloonctl, a python3 start: seconds under TCG, not the 3 s the
# compose file allows on a real host.
TCG_OVERRIDE = """
services:
  hostd:
    healthcheck:
      timeout: 60s
      interval: 5s
      retries: 30
      start_period: 120s
"""


def _progress(what: str, since: float) -> None:
    print(f"compose-v2: {what} at {time.monotonic() - since:.0f} s", flush=True)


@pytest.fixture
def lab(engine, tmp_path: Path) -> Iterator[ComposeLab]:
    since = time.monotonic()
    require_swap(1 << 30)
    require(PLUGIN.is_file(), "needs the Compose v2 plugin on the host (scripts/setup-docker.sh installs it); "
                              "scripts/vm/run.sh hands it in")
    PLUGINS.mkdir(parents=True, exist_ok=True)
    shutil.copy(PLUGIN, PLUGINS / "docker-compose")
    (PLUGINS / "docker-compose").chmod(0o755)
    assert compose_command() == ["docker", "compose"]
    if subprocess.run(["docker", "image", "inspect", OFFLINE_BASE_IMAGE], capture_output=True).returncode != 0:
        tar = subprocess.Popen(["tar", "-C", "/", "--one-file-system", *(f"--exclude={x}" for x in ROOT_EXCLUDES),
                                "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["docker", "import", "--change",
                        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                        "--change", 'CMD ["python3"]', "-", OFFLINE_BASE_IMAGE],
                       stdin=tar.stdout, check=True, capture_output=True, timeout=600)
        assert tar.stdout is not None
        tar.stdout.close()
        tar.wait()
        _progress(f"{OFFLINE_BASE_IMAGE} imported from the guest's root", since)
    override = tmp_path / "tcg.override.yml"
    override.write_text(TCG_OVERRIDE)
    compose_lab = ComposeLab("balloonlab-v2", {
        "COMPOSE_FILE": f"docker-compose.yml:{override}",
        # three 256 MiB guests on 400 MiB, small working sets: TCG touches memory 25× slower
        "BALLOONLAB_HOST_MEMORY": "400MiB", "BALLOONLAB_SAMPLE_PERIOD": "3s", "BALLOONLAB_BALANCE_PERIOD": "2s",
        **{f"{guest.upper()}_MEMORY": "256m" for guest in GUESTS},
        **{f"{guest.upper()}_MEMORY_AND_SWAP": "512m" for guest in GUESTS},
        "WEB_PHASES": "active 96MiB", "DB_PHASES": "active 80MiB", "BATCH_PHASES": "active 96MiB for 15s, idle 900s",
    })
    compose_lab.down()  # a run killed earlier may have left the project behind
    _progress("ready for compose up", since)
    try:
        yield compose_lab
    finally:
        print(compose_lab.logs())
        compose_lab.down()
    assert compose_lab.leftovers() == [], "compose down left containers or networks behind"


def _status(lab: ComposeLab) -> dict[str, Any] | None:
    """hostd's snapshot from its published HTTP port (/status.json), from this process: the
    lab's control endpoint is on hostd's own loopback only, and a balloonctl per poll through
    `docker compose exec` is a python3 start, over 30 s under TCG with the lab running."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{lab.http_port}/status.json", timeout=10) as response:
            document: dict[str, Any] = json.loads(response.read())
    except Exception:
        return None
    return document


def test_compose_lab_comes_up_with_compose_v2_and_balloons(lab: ComposeLab, figures) -> None:
    version = compose_version(lab.command)
    assert version.startswith("v2 "), version
    started = time.monotonic()
    lab.up()
    up_done = time.monotonic() - started
    _progress("compose up done", started)

    def all_registered() -> dict[str, Any] | None:
        snapshot = _status(lab)
        if snapshot and sorted(vm["vm_id"] for vm in snapshot["vms"] if vm["alive"] and vm["has_agent"]) == \
                list(GUESTS):
            return snapshot
        return None

    assert wait_for(all_registered, timeout_s=300, interval_s=2), f"not every guest registered: {_status(lab)}"
    registered = time.monotonic() - started
    _progress("all guests registered", started)
    latest: dict[str, Any] = {}

    def balloons_moving() -> bool:
        snapshot = _status(lab)
        latest.update(snapshot or {})
        return bool(snapshot) and sum(vm["balloon_bytes"] for vm in snapshot["vms"]) > 32 * MiB

    assert wait_for(balloons_moving, timeout_s=300, interval_s=2), f"no balloon moved: {_status(lab)}"
    ballooning = time.monotonic() - started
    # Each guest container is a systemd scope on the unified hierarchy.
    for guest in GUESTS:
        container_id = docker("inspect", "-f", "{{.Id}}", f"{lab.project}-{guest}-1", check=False) or \
            docker("inspect", "-f", "{{.Id}}", f"{lab.project}_{guest}_1")
        scope = ROOT / "system.slice" / f"docker-{container_id}.scope"
        assert (scope / "memory.max").read_text().strip() == str(256 * MiB), guest
        assert (scope / "memory.swap.max").read_text().strip() == str(256 * MiB), guest
    vms = {vm["vm_id"]: vm for vm in latest["vms"]}
    figures.update(compose=version, up_s=round(up_done, 1), all_registered_s=round(registered, 1),
                   balloons_over_32MiB_s=round(ballooning, 1),
                   **{f"{name}_balloon_MiB": mib(vm["balloon_bytes"]) for name, vm in vms.items()})
