"""The docker host backend against a fake Docker client (the real engine is exercised by the e2e
test): the API calls it makes, Docker's memory ≤ memory+swap rule, idempotent pause, clear
errors, and where it finds a container's memory cgroup."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostd.cgroupfs import BackendError
from hostd.docker_backend import DockerBackend

MiB = 1 << 20
CONTAINER_ID = "c0ffee" * 10 + "abcd"


class FakeContainer:
    def __init__(self, memory: int, memory_and_swap: int, status: str = "running") -> None:
        self.id, self.name, self.status = CONTAINER_ID, "plain", status
        self.attrs = {"HostConfig": {"Memory": memory, "MemorySwap": memory_and_swap}}
        self.calls: list[tuple] = []

    def update(self, **kwargs):
        self.calls.append(("update", kwargs))
        self.attrs["HostConfig"]["Memory"] = kwargs["mem_limit"]

    def pause(self):
        self.calls.append(("pause",))
        self.status = "paused"

    def unpause(self):
        self.calls.append(("unpause",))
        self.status = "running"


class NotFound(Exception):
    explanation = "No such container: ghost"


class FakeClient:
    def __init__(self, container: FakeContainer, listed: list | None = None) -> None:
        self.container = container
        self.containers = self
        self.listed = listed or []
        self.filters: dict | None = None

    def list(self, filters: dict) -> list:
        self.filters = filters
        return self.listed

    def get(self, name: str) -> FakeContainer:
        if name != "plain":
            raise NotFound()
        return self.container


def backend(container: FakeContainer, root: Path = Path("/nonexistent")) -> DockerBackend:
    return DockerBackend(root, client=FakeClient(container))


def test_limit_read_and_lowered_through_the_api():
    container = FakeContainer(512 * MiB, 1024 * MiB)
    docker = backend(container)
    assert docker.limit_bytes("docker:plain") == 512 * MiB
    docker.set_limit_bytes("docker:plain", 300 * MiB)
    assert container.calls == [("update", {"mem_limit": 300 * MiB})]  # memory+swap stays the guest's


def test_memory_and_swap_raised_when_the_limit_would_pass_it():
    container = FakeContainer(256 * MiB, 256 * MiB)  # no swap allowed: memory+swap = memory
    backend(container).set_limit_bytes("docker:plain", 400 * MiB)
    assert container.calls == [("update", {"mem_limit": 400 * MiB, "memswap_limit": 400 * MiB})]


def test_pause_and_unpause_only_when_needed():
    container = FakeContainer(512 * MiB, 1024 * MiB)
    docker = backend(container)
    docker.set_frozen("docker:plain", True)
    docker.set_frozen("docker:plain", True)
    assert docker.frozen("docker:plain")
    docker.set_frozen("docker:plain", False)
    assert [call[0] for call in container.calls] == ["pause", "unpause"]


def test_errors_name_the_container_and_the_cause():
    docker = backend(FakeContainer(512 * MiB, 1024 * MiB))
    with pytest.raises(BackendError, match="container ghost: No such container"):
        docker.limit_bytes("docker:ghost")
    with pytest.raises(BackendError, match="cannot lift a memory limit"):
        docker.set_limit_bytes("docker:plain", None)


def test_usage_from_the_containers_cgroup_v1_and_v2(tmp_path):
    v1 = tmp_path / "v1" / "memory" / "docker" / CONTAINER_ID
    v1.mkdir(parents=True)
    for name, value in {"memory.usage_in_bytes": 300 * MiB, "memory.limit_in_bytes": 512 * MiB,
                        "memory.memsw.usage_in_bytes": 340 * MiB, "memory.memsw.limit_in_bytes": 1024 * MiB}.items():
        (v1 / name).write_text(f"{value}\n")
    (v1 / "memory.stat").write_text(f"cache 0\nrss {300 * MiB}\ntotal_swap {40 * MiB}\n")
    (v1 / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    assert backend(FakeContainer(512 * MiB, 1024 * MiB), tmp_path / "v1").usage_bytes("docker:plain") == \
        (300 * MiB, 40 * MiB)
    v2 = tmp_path / "v2" / "system.slice" / f"docker-{CONTAINER_ID}.scope"
    v2.mkdir(parents=True)
    for name, value in {"memory.current": 200 * MiB, "memory.max": 512 * MiB, "memory.swap.current": 8 * MiB,
                        "memory.swap.max": "max"}.items():
        (v2 / name).write_text(f"{value}\n")
    (v2 / "memory.stat").write_text("anon 0\nfile 0\n")
    (v2 / "memory.events").write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n")
    assert backend(FakeContainer(512 * MiB, 1024 * MiB), tmp_path / "v2").usage_bytes("docker:plain") == \
        (200 * MiB, 8 * MiB)
    with pytest.raises(BackendError, match="no memory cgroup found"):
        backend(FakeContainer(512 * MiB, 1024 * MiB), tmp_path / "none").usage_bytes("docker:plain")


class Labelled:
    def __init__(self, name: str, vm_id: str) -> None:
        self.name, self.labels = name, {"balloonlab.vm": vm_id}


def test_containers_labelled_for_a_vm_are_discovered():
    client = FakeClient(FakeContainer(512 * MiB, 1024 * MiB),
                        [Labelled("lab-web-1", "web"), Labelled("lab-plain-1", "plain"), Labelled("odd", "no/such id")])
    docker = DockerBackend(Path("/nonexistent"), client=client)
    found = docker.discover("balloonlab.vm", "balloonlab.lab=lab")
    assert found == {"web": "docker:lab-web-1", "plain": "docker:lab-plain-1"}  # an invalid vm id is skipped
    assert client.filters == {"label": ["balloonlab.vm", "balloonlab.lab=lab"]}


class Gone(Exception):
    status_code = 404
    explanation = "No such container: ghost"


def test_a_removed_container_is_target_gone_and_other_errors_are_not():
    from hostd.cgroupfs import TargetGone

    docker = backend(FakeContainer(512 * MiB, 1024 * MiB))

    def get(name):
        raise Gone()

    docker.client.get = get
    with pytest.raises(TargetGone, match="container ghost: No such container"):
        docker.set_frozen("docker:ghost", False)
    with pytest.raises(BackendError) as raised:
        backend(FakeContainer(512 * MiB, 1024 * MiB)).limit_bytes("docker:ghost")  # no status code: unknown
    assert not isinstance(raised.value, TargetGone)


def test_with_a_lab_label_only_that_labs_containers_are_touched():
    foreign = FakeContainer(512 * MiB, 1024 * MiB)
    foreign.labels = {"balloonlab.lab": "other"}
    guarded = DockerBackend(Path("/nonexistent"), client=FakeClient(foreign), required_label="balloonlab.lab=mine")
    for action in (lambda: guarded.set_limit_bytes("docker:plain", 256 * MiB),
                   lambda: guarded.set_frozen("docker:plain", True)):
        with pytest.raises(BackendError, match=r"does not carry the label balloonlab\.lab=mine"):
            action()
    assert foreign.calls == [] and foreign.status == "running"
    foreign.labels = {"balloonlab.lab": "mine"}
    guarded.set_frozen("docker:plain", True)
    assert foreign.calls == [("pause",)]
