"""The `docker` host backend: a guest that is a Docker container, through the Docker Engine API
(docker-py): its memory limit with `container.update(mem_limit=...)` and blocking with
pause/unpause, so `docker inspect` and `docker ps` show what hostd did. Usage is read from the
container's memory cgroup (the stats API takes a second or two per call, too slow for a loop
that looks every second): under `cgroup_root` at the paths Docker's cgroupfs and systemd
drivers use, on cgroup v1 or v2. hostd in a container needs the Docker socket and the host's
/sys/fs/cgroup mounted (docker-compose.yml does both)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cgroups import docker_cgroup_paths
from hostd.cgroupfs import BackendError, TargetGone, usage_of
from protocol.errors import ProtocolError
from protocol.messages import check_vm_id

PREFIX = "docker:"


class DockerBackend:
    def __init__(self, cgroup_root: Path, client: Any = None, required_label: str = "") -> None:
        """`required_label` ("key=value"): act only on containers carrying it (checked on every
        action, against the container as the engine reports it now)."""
        self.cgroup_root = cgroup_root
        self._client = client
        key, _sep, value = required_label.partition("=")
        self._required = (key, value) if key else None

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                import docker
            except ImportError:
                raise BackendError("the docker backend needs the docker Python package (pip install docker, "
                                   "or Debian's python3-docker)") from None
            try:
                self._client = docker.from_env(timeout=10)
                self._client.ping()
            except Exception as exc:  # docker.errors.DockerException and the socket's own errors
                self._client = None
                raise BackendError(f"cannot reach the Docker engine ({exc}); hostd needs its socket "
                                   "(/var/run/docker.sock) and the right to use it") from None
        return self._client

    def _container(self, target: str) -> Any:
        name = target.removeprefix(PREFIX)
        try:
            container = self.client.containers.get(name)
        except BackendError:
            raise
        except Exception as exc:
            detail = f"container {name}: {getattr(exc, 'explanation', None) or exc}"
            if getattr(exc, "status_code", None) == 404:  # docker.errors.NotFound
                raise TargetGone(detail) from None
            raise BackendError(detail) from None
        if self._required is not None:
            key, value = self._required
            labels = getattr(container, "labels", None) or {}
            if labels.get(key) != value:
                raise BackendError(f"container {name} does not carry the label {key}={value}: hostd acts only on "
                                   "this lab's containers")
        return container

    def _call(self, target: str, what: str, action: Any) -> None:
        try:
            action()
        except Exception as exc:
            detail = getattr(exc, "explanation", None) or exc
            raise BackendError(f"container {target.removeprefix(PREFIX)}: {what} failed: {detail}") from None

    def discover(self, label: str, label_filter: str = "") -> dict[str, str]:
        """vm → "docker:NAME" for every running or paused container labelled `label=VM_ID`
        (and `label_filter`, "key=value", when given). Invalid vm ids are skipped."""
        filters = [label] + ([label_filter] if label_filter else [])
        try:
            containers = self.client.containers.list(filters={"label": filters})
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"listing containers labelled {filters}: {exc}") from None
        found: dict[str, str] = {}
        for container in containers:
            vm_id = container.labels.get(label, "")
            try:
                check_vm_id(vm_id)
            except ProtocolError:
                continue
            found[vm_id] = PREFIX + container.name
        return found

    # ---- the backend's methods ------------------------------------------------------------
    def usage_bytes(self, target: str) -> tuple[int, int | None]:
        container = self._container(target)
        if container.status != "running" and container.status != "paused":
            raise BackendError(f"container {container.name} is {container.status}")
        return usage_of(self.cgroup_path(container.id))

    def cgroup_path(self, container_id: str) -> Path:
        root = self.cgroup_root
        for path in docker_cgroup_paths(container_id, root):
            if path.is_dir():
                return path
        raise BackendError(f"container {container_id[:12]}: no memory cgroup found under {root} "
                           "(in a container, mount the host's /sys/fs/cgroup and set cgroup_root)")

    def limit_bytes(self, target: str) -> int | None:
        memory = self._container(target).attrs["HostConfig"].get("Memory") or 0
        return int(memory) or None

    def set_limit_bytes(self, target: str, limit_bytes: int | None) -> None:
        if limit_bytes is None:
            raise BackendError(f"container {target.removeprefix(PREFIX)}: Docker cannot lift a memory limit "
                               "once set (and hostd only schedules containers that have one)")
        if limit_bytes < 0:  # checked before the engine sees it, as CgroupfsBackend does
            raise BackendError(f"limit {limit_bytes}: must be ≥ 0")
        container = self._container(target)
        host_config = container.attrs["HostConfig"]
        memory_and_swap = int(host_config.get("MemorySwap") or 0)
        update: dict[str, int] = {"mem_limit": limit_bytes}
        if 0 < memory_and_swap < limit_bytes:
            update["memswap_limit"] = limit_bytes  # Docker wants memory ≤ memory+swap
        self._call(target, f"update to {limit_bytes >> 20} MiB", lambda: container.update(**update))

    def set_frozen(self, target: str, frozen: bool) -> None:
        container = self._container(target)
        if (container.status == "paused") == frozen:
            return
        self._call(target, "pause" if frozen else "unpause", container.pause if frozen else container.unpause)

    def frozen(self, target: str) -> bool:
        return bool(self._container(target).status == "paused")
