"""hostd's hands on its guests (I/O around the pure decisions of hostd/vswap.py): read each
configured vm's memory use, carry out the core's limit / freeze / thaw actions through its
host backend — `cgroupfs` for a cgroup path, `docker` for "docker:NAME" — and keep a
write-ahead record of everything changed, so that neither a clean exit nor a crash (kill -9)
leaves a guest frozen or squeezed: `recover()` at start-up and `restore_all()` at exit put
every guest back as it was.

The record (`vswap_state_file`, JSON): {target: {"own_limit_bytes": int | null, "frozen": bool}}
— written before a limit is lowered or a freeze starts, entries dropped once undone.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from hostd.cgroupfs import BackendError, CgroupfsBackend
from hostd.docker_backend import PREFIX as DOCKER_PREFIX
from hostd.docker_backend import DockerBackend

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CgroupReading:
    usage_bytes: int
    swap_bytes: int | None
    own_limit_bytes: int | None  # the limit before hostd changed anything


class HostBackend(Protocol):
    def usage_bytes(self, target: str) -> tuple[int, int | None]: ...
    def limit_bytes(self, target: str) -> int | None: ...
    def set_limit_bytes(self, target: str, limit_bytes: int | None) -> None: ...
    def set_frozen(self, target: str, frozen: bool) -> None: ...


class HostReclaimer:
    def __init__(self, targets: dict[str, str], state_file: Path, cgroupfs: CgroupfsBackend,
                 docker: DockerBackend | None = None) -> None:
        self.targets = dict(targets)  # vm → cgroup path or "docker:NAME" (discovery adds to it)
        self.state_file = state_file
        self._cgroupfs = cgroupfs
        self._docker = docker or DockerBackend(cgroupfs.root)
        self._record: dict[str, dict[str, Any]] = {}
        self._own_limits: dict[str, int | None] = {}
        self._failed: dict[tuple[str, str], str] = {}  # (vm, action) → the last failure

    def discover(self, label: str, label_filter: str) -> dict[str, str]:
        return self._docker.discover(label, label_filter)

    def backend(self, target: str) -> HostBackend:
        return self._docker if target.startswith(DOCKER_PREFIX) else self._cgroupfs

    # ---- the write-ahead record -------------------------------------------------------
    def _save(self) -> None:
        if not self._record:
            self.state_file.unlink(missing_ok=True)
            return
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.state_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(self._record, sort_keys=True))
        os.replace(temporary, self.state_file)  # never a half-written record

    def recover(self) -> list[str]:
        """Undo what a previous hostd left behind (it crashed, or was killed). Returns one line
        per cgroup put back; cgroups that cannot be put back are logged and left recorded."""
        try:
            record = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.error("vswap record %s unreadable (%s): nothing recovered", self.state_file, exc)
            return []
        if not isinstance(record, dict):
            return []
        done = []
        for cgroup, entry in record.items():
            if not isinstance(entry, dict):
                continue
            try:
                backend = self.backend(cgroup)
                if entry.get("frozen"):
                    backend.set_frozen(cgroup, False)
                own = entry.get("own_limit_bytes")
                backend.set_limit_bytes(cgroup, own if isinstance(own, int) else None)
                done.append(f"{cgroup}: thawed, limit back to {own}")
            except BackendError as exc:
                log.error("could not restore %s: %s", cgroup, exc)
                self._record[cgroup] = entry
        if self._record:
            self._save()
        else:
            self.state_file.unlink(missing_ok=True)
        for line in done:
            log.warning("recovered from a previous hostd: %s", line)
        return done

    # ---- reading ----------------------------------------------------------------------
    def read(self, vm_id: str) -> CgroupReading:
        target = self.targets[vm_id]
        backend = self.backend(target)
        usage, swap = backend.usage_bytes(target)
        if target not in self._record:  # not lowered by us: whatever it is now is its own
            self._own_limits[target] = backend.limit_bytes(target)
        return CgroupReading(usage, swap, self._own_limits.get(target))

    # ---- acting ----------------------------------------------------------------------
    def apply(self, actions: list[tuple[str, str, str, int | None]]) -> list[tuple[str, str, str]]:
        """Carry out the core's actions; returns (vm, action, why) for each that failed."""
        failures = []
        for vm_id, cgroup, action, limit_bytes in actions:
            try:
                self._apply_one(cgroup, action, limit_bytes)
                self._failed.pop((vm_id, action), None)
            except BackendError as exc:
                if self._failed.get((vm_id, action)) != str(exc):  # logged once, retried every second
                    log.warning("vm %s: %s failed: %s", vm_id, action, exc)
                self._failed[(vm_id, action)] = str(exc)
                failures.append((vm_id, action, str(exc)))
        return failures

    def _apply_one(self, cgroup: str, action: str, limit_bytes: int | None) -> None:
        backend = self.backend(cgroup)
        entry = self._record.get(cgroup)
        if action == "limit" and limit_bytes is not None:
            if entry is None:
                self._record[cgroup] = {"own_limit_bytes": self._own_limits.get(cgroup), "frozen": False}
                self._save()
            backend.set_limit_bytes(cgroup, limit_bytes)
        elif action == "limit":
            own = entry["own_limit_bytes"] if entry is not None else self._own_limits.get(cgroup)
            backend.set_limit_bytes(cgroup, own)
            if entry is not None and not entry["frozen"]:
                del self._record[cgroup]
                self._save()
            elif entry is not None:
                entry["own_limit_bytes"] = own
        elif action == "freeze":
            if entry is None:
                entry = self._record[cgroup] = {"own_limit_bytes": self._own_limits.get(cgroup), "frozen": True}
            entry["frozen"] = True
            self._save()
            backend.set_frozen(cgroup, True)
        elif action == "thaw":
            backend.set_frozen(cgroup, False)
            if entry is not None:
                entry["frozen"] = False
                self._save()

    def restore_all(self) -> None:
        """At exit: thaw every frozen guest and give every lowered one its limit back."""
        for cgroup, entry in list(self._record.items()):
            try:
                backend = self.backend(cgroup)
                if entry.get("frozen"):
                    backend.set_frozen(cgroup, False)
                backend.set_limit_bytes(cgroup, entry.get("own_limit_bytes"))
                del self._record[cgroup]
            except BackendError as exc:
                log.error("could not restore %s at exit: %s (kept in %s for the next start)", cgroup, exc,
                          self.state_file)
        if self._record:
            self._save()
        else:
            self.state_file.unlink(missing_ok=True)
