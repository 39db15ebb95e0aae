"""Docker on a real cgroup-v2 kernel with systemd as init and Docker's systemd cgroup driver
(Debian's docker.io in the v2 guest): the docker backend finds the container's cgroup at
system.slice/docker-<id>.scope, hostd pages an agentless container out with `docker update`
and blocks it with pause/unpause, and the next hostd undoes what a kill -9 left."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from hostd.docker_backend import DockerBackend
from tests.conftest import require_swap
from tests.v2.docker_v2 import IMAGE, docker
from tests.v2.hostd_v2 import SlowHostd
from tests.v2.v2 import ROOT, MiB, mib, wait

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.e2e, pytest.mark.timeout(900)]
HELD_MiB = 256


def test_docker_v2_systemd_driver_update_pause_and_kill_9_recovery(engine, tmp_path: Path, figures) -> None:
    require_swap(1 << 30)
    info = docker("info", "--format", "{{.CgroupDriver}} {{.CgroupVersion}} {{.ServerVersion}}").split()
    assert info[:2] == ["systemd", "2"], info
    lab = f"v2-{uuid.uuid4().hex[:8]}"
    name = f"balloonlab-{lab}-plain"
    container_id = docker("run", "-d", "--name", name, "--label", "balloonlab.vm=plain", "--label",
                          f"balloonlab.lab={lab}", "--label", "balloonlab.v2=1", "--network", "none",
                          "--memory", "512m", "--memory-swap", "1024m", "--shm-size", "400m", IMAGE, "sh", "-c",
                          f"dd if=/dev/zero of=/dev/shm/held bs=1M count={HELD_MiB} && exec sleep 1000000",
                          timeout_s=300)
    hostd = again = None
    try:
        scope = ROOT / "system.slice" / f"docker-{container_id}.scope"
        assert DockerBackend(ROOT).cgroup_path(container_id) == scope  # the v2 + systemd driver's path
        assert (scope / "memory.max").read_text().strip() == str(512 * MiB)
        wait(lambda: int((scope / "memory.current").read_text()) >= (HELD_MiB - 4) * MiB, 180,
             "the container to hold its memory")

        def limit() -> int:
            return int(docker("inspect", "-f", "{{.HostConfig.Memory}}", name))

        def state() -> str:
            return docker("inspect", "-f", "{{.State.Status}}", name)

        hostd = SlowHostd(tmp_path, "--docker-label", "balloonlab.vm", "--docker-label-filter",
                          f"balloonlab.lab={lab}", "--host-memory", "160MiB", "--block-max", "300s",
                          "--balance-period", "1s", "--report-interval", "500ms",
                          "--vswap-state-file", str(tmp_path / "vswap.json"))
        started = time.monotonic()
        snapshot = hostd.wait_until(lambda s: any(v["vm_id"] == "plain" and v["alive"] for v in s["vms"]), 180,
                                    "hostd to find the labelled container")
        found = next(v for v in snapshot["vms"] if v["vm_id"] == "plain")
        assert found["has_agent"] is False and found["host_target"] == f"docker:{name}"
        found_at = time.monotonic() - started
        paused_at = wait(lambda: state() == "paused", 120, "docker pause in the low state", 0.5) + found_at
        assert (scope / "cgroup.freeze").read_text().strip() == "1"
        swapped_at = wait(lambda: limit() < 512 * MiB and int((scope / "memory.swap.current").read_text())
                          >= 64 * MiB, 180, "docker update to page the container out", 0.5) + paused_at
        lowered, swap = limit(), int((scope / "memory.swap.current").read_text())
        assert int((scope / "memory.max").read_text()) < 512 * MiB  # docker update reached the cgroup
        hostd.stop(kill=True)
        hostd = None
        left = (limit(), state())
        assert left[0] < 512 * MiB, left

        again = SlowHostd(tmp_path, "--docker-label", "balloonlab.vm", "--docker-label-filter",
                          f"balloonlab.lab={lab}", "--host-memory", "8GiB",
                          "--vswap-state-file", str(tmp_path / "vswap.json"))
        restored = wait(lambda: limit() == 512 * MiB and state() == "running", 180,
                        "the next hostd to give the limit back and unpause", 0.5)
        events = dict(line.split() for line in (scope / "memory.events").read_text().splitlines())
        assert int(events["oom_kill"]) == 0, events
        figures.update(docker=" ".join(info), dockerd_ready_s=round(engine, 1), cgroup=str(scope.relative_to(ROOT)),
                       found_after_s=round(found_at, 1), paused_after_s=round(paused_at, 1),
                       paged_out_after_s=round(swapped_at, 1), limit_lowered_to_MiB=mib(lowered),
                       swap_MiB=mib(swap), left_by_kill_9=f"{mib(left[0])} MiB, {left[1]}",
                       restored_within_s=round(restored, 1), oom_kills=int(events["oom_kill"]))
        print(json.dumps(figures))
    finally:
        for process in (hostd, again):
            if process is not None:
                process.stop()
        docker("rm", "-f", name, check=False)
