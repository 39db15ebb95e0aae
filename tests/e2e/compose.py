"""The compose lab driven from a test: `docker compose` (v2) or `docker-compose` (v1), a
project name of its own so a user's running lab is never touched, and a teardown that
always runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.conftest import free_loopback_port

REPO_ROOT = Path(__file__).resolve().parents[2]
OFFLINE_BASE_IMAGE = "balloonlab-base:bookworm"


def compose_command() -> list[str] | None:
    """`docker compose` (the v2 plugin, what the README runs) when it answers, else
    `docker-compose` (v1). E2E_COMPOSE=v1 or v2 asks for one (None when it is missing)."""
    wanted = os.environ.get("E2E_COMPOSE", "").lower()
    if wanted not in ("v1", "v2"):
        wanted = ""
    if wanted != "v1" and shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if wanted != "v2" and shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def compose_version(command: list[str]) -> str:
    """e.g. "v2 2.40.3" or "v1 1.29.2"."""
    probe = subprocess.run([*command, "version", "--short"], capture_output=True, text=True)
    generation = "v2" if command[0] == "docker" else "v1"
    return f"{generation} {probe.stdout.strip().removeprefix('v')}"


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0


class ComposeLab:
    def __init__(self, project: str, overrides: dict[str, str]) -> None:
        command = compose_command()
        assert command is not None, "no docker compose / docker-compose"
        self.command = command
        # Each run names its own project (the test passes PREFIX<pid>); E2E_COMPOSE_PROJECT overrides it.
        self.project = os.environ.get("E2E_COMPOSE_PROJECT") or project
        self.http_port = free_loopback_port()
        self.environ = {**os.environ, "COMPOSE_PROJECT_NAME": self.project, "BALLOONLAB_IMAGE_TAG": self.project,
                        "BALLOONLAB_HTTP_PORT": str(self.http_port), **overrides}
        if image_exists(OFFLINE_BASE_IMAGE):  # no registry here: the image scripts/build-base-image.sh makes
            self.environ.setdefault("BASE_IMAGE", OFFLINE_BASE_IMAGE)
            self.environ.setdefault("INSTALL", "none")
            self.environ.setdefault("REDIS_IMAGE", OFFLINE_BASE_IMAGE)  # it carries Debian's redis-server

    def run(self, *args: str, timeout_s: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*self.command, *args], cwd=REPO_ROOT, env=self.environ, capture_output=True,
                                text=True, timeout=timeout_s)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(self.command + list(args))} failed ({result.returncode}):\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def up(self, *services: str) -> None:
        """The whole lab, or only `services` (and what they depend on)."""
        print(f"compose lab up with {' '.join(self.command)} ({compose_version(self.command)})")
        self.run("up", "-d", "--build", *services, timeout_s=900)

    def down(self) -> None:
        """Containers, network and the project's image; the base image stays for the next run."""
        self.run("down", "--volumes", "--timeout", "20", "--rmi", "local", timeout_s=300, check=False)
        subprocess.run(["docker", "image", "rm", "-f", f"balloonlab:{self.project}"], capture_output=True)

    def logs(self, tail_lines: int = 60, timeout_s: float = 60) -> str:
        """The services' last lines, for a report (never raises: a teardown goes on without them)."""
        try:
            result = self.run("logs", "--no-color", "--tail", str(tail_lines), timeout_s=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return f"(docker compose logs did not finish within {timeout_s} s)"
        return result.stdout + result.stderr

    def balloonctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """balloonctl inside hostd's container: the control endpoint is on its loopback only
        (unreachable from the guests), and the token it needs is in its state volume."""
        return self.run("exec", "-T", "hostd", "python3", "-m", "balloonctl", "--endpoint", "tcp://127.0.0.1:5556",
                        *args, timeout_s=60, check=False)

    def status(self) -> dict[str, Any] | None:
        """hostd's snapshot (None while it is not up)."""
        result = self.balloonctl("status", "--json")
        if result.returncode != 0:
            return None
        try:
            snapshot: dict[str, Any] = json.loads(result.stdout)
        except ValueError:
            return None
        return snapshot

    def ctl(self, *args: str) -> str:
        for _ in range(3):  # a 2-core host shared with other jobs: hostd may miss balloonctl's 3 s
            result = self.balloonctl(*args)
            if result.returncode == 0 or "no answer from hostd" not in result.stderr:
                break
        assert result.returncode == 0, f"balloonctl {' '.join(args)}: {result.stderr}"
        return result.stdout

    def exec(self, service: str, *argv: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        """A command run in a service's container (not checked)."""
        return self.run("exec", "-T", service, *argv, timeout_s=timeout_s, check=False)

    def container_id(self, service: str) -> str:
        result = self.run("ps", "-a", "-q", service, timeout_s=60)
        return result.stdout.strip().splitlines()[0] if result.stdout.strip() else ""

    def guest_python(self, service: str, script: str, *args: str) -> subprocess.CompletedProcess[str]:
        """A python3 program run inside a guest, as its workload could."""
        return subprocess.run([*self.command, "exec", "-T", service, "python3", "-", *args], input=script,
                              cwd=REPO_ROOT, env=self.environ, capture_output=True, text=True, timeout=60)

    def leftovers(self) -> list[str]:
        """Containers and networks of this project still present."""
        label = f"label=com.docker.compose.project={self.project}"
        found: list[str] = []
        for listing_command in (["container", "ls", "-a"], ["network", "ls"]):
            listing = subprocess.run(["docker", *listing_command, "-q", "--filter", label],
                                     capture_output=True, text=True)
            found += [f"{listing_command[0]} {name}" for name in listing.stdout.split()]
        return found


def remove_stale_labs(prefix: str) -> None:
    """Take down labs named PREFIX<pid> whose test process is gone (a run that was killed)."""
    listing = subprocess.run(["docker", "ps", "-a", "--format", '{{.Label "com.docker.compose.project"}}'],
                             capture_output=True, text=True)
    for project in sorted(set(listing.stdout.split())):
        pid = project.removeprefix(prefix)
        if project.startswith(prefix) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            ComposeLab(project, {}).down()


def wait_for(predicate: Any, timeout_s: float, interval_s: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        time.sleep(interval_s)
