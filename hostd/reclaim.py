"""hostd's hands on its guests (I/O around the pure decisions of hostd/vswap.py): read each
configured vm's memory use, carry out the core's limit / freeze / thaw actions through its
host backend — `cgroupfs` for a cgroup path, `docker` for "docker:NAME" — and keep a
write-ahead record of everything changed, so that neither a clean exit nor a crash (kill -9)
leaves a guest frozen or squeezed: `recover()` at start-up and `restore_all()` at exit put
every guest back as it was.

The record (`vswap_state_file`, JSON): {target: {"own_limit_bytes": int | null, "limited":
bool, "freezing": bool, "frozen": bool}}. It is written (temp file, fsync, rename, fsync of the
directory) *before* a limit is first lowered ("limited") and before a freeze is attempted
("freezing"); "frozen" is set only once the freeze succeeded. If it cannot be written, the
limit is not lowered and the guest not frozen: the action fails like a backend error. Undoing
never waits for the record: a guest is thawed and given its limit back first, the record
updated after (a failure there only leaves an entry whose undoing is a no-op). Thawing and
restoring the limit are independent: one failing never stops the other.

The guest's own limit is never learned from a limit hostd set: a limit write that reports a
failure is taken as undone only once the limit reads back as it was (it may have happened: a
client timeout, an interrupted write), and a reading equal to a lowered limit hostd wrote,
with no record left to undo it, keeps the known own limit and puts it back.

A "pageout" action (vswap_mode = "blind") pages out random resident pages of the guest's
processes (hostd/pageout.py) just before the "limit" action that holds the cgroup there; it
changes nothing that must be undone (the pages fault back in), so it is not recorded.

The record's file and directory checks are hostd/vswap_record.py's (a directory another user
could write to means nothing is written, so nothing is squeezed). `recover()` acts only on
targets this configuration names or Docker discovery finds (containers with the lab's label);
other entries are logged and kept.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hostd.cgroupfs import BackendError, CgroupfsBackend, TargetGone
from hostd.docker_backend import PREFIX as DOCKER_PREFIX
from hostd.docker_backend import DockerBackend
from hostd.host_actions import ActionFailure, CgroupReading, HostAction, HostBackend, HostVerb
from hostd.pageout import PageoutResult
from hostd.vswap_record import RECORD_FLAGS, RecordError, RecordFile, record_entry

log = logging.getLogger(__name__)

_UNKNOWN = object()  # a limit that could not be read back


def _mib(limit: int | None) -> str:
    return "none" if limit is None else f"{limit >> 20} MiB"


class HostReclaimer:
    def __init__(self, targets: dict[str, str], state_file: Path, cgroupfs: CgroupfsBackend,
                 docker: DockerBackend | None = None, docker_label: str = "", docker_label_filter: str = "") -> None:
        self.targets = dict(targets)  # vm → cgroup path or "docker:NAME" (discovery adds to it)
        self.state_file = state_file
        self._file = RecordFile(state_file)
        self._cgroupfs = cgroupfs
        # With a lab label ("key=value"), hostd acts only on containers that carry it: the Docker
        # socket is root on the machine, and this keeps hostd from touching anything else.
        self._docker = docker or DockerBackend(cgroupfs.root, required_label=docker_label_filter)
        self._docker_label = docker_label
        self._docker_label_filter = docker_label_filter
        self._record: dict[str, dict[str, Any]] = {}  # targets hostd changed (or a previous one did)
        self._foreign: dict[str, Any] = {}  # entries for targets nobody configured: kept, never acted on
        self._pending: set[str] = set()  # recovered entries not yet undone (retried each step)
        self._thaw_retry: set[str] = set()  # thaws that failed (the core does not ask again)
        self._restore_errors: dict[str, list[str]] = {}  # target → why undoing it failed (logged once)
        self._dirty = False  # the file is behind self._record (an update after an undo failed)
        self._own_limits: dict[str, int | None] = {}  # target → its own limit (never one hostd set)
        self._set_by_us: dict[str, set[int]] = {}  # target → lowered limits hostd wrote since its own was seen
        self._failed: dict[tuple[str, str], str] = {}  # (vm, action) → the last failure
        self._rng = random.Random()  # blind host swap's page choice
        self.last_pageout: dict[str, PageoutResult] = {}  # target → what its last blind pageout took

    def discover(self, label: str, label_filter: str) -> dict[str, str]:
        return self._docker.discover(label, label_filter)

    def backend(self, target: str) -> HostBackend:
        return self._docker if target.startswith(DOCKER_PREFIX) else self._cgroupfs

    # ---- the write-ahead record (its file: hostd/vswap_record.py) ----------------------
    def _save(self) -> None:
        """Write-ahead: before a guest is squeezed or frozen. Raises RecordError (logged once
        per reason) and the caller refuses the action."""
        self._file.write({**self._foreign, **self._record})
        self._dirty = False

    def _save_best_effort(self) -> None:
        """After a guest was put back (or a freeze confirmed): a failure here is logged, and
        retried at the next step; the file only holds more to undo than there is."""
        try:
            self._save()
        except RecordError:
            self._dirty = True

    def _known_for_recovery(self, record: dict[str, Any]) -> set[str]:
        known = set(self.targets.values())
        if self._docker_label and any(t.startswith(DOCKER_PREFIX) and t not in known for t in record):
            try:
                known |= set(self.discover(self._docker_label, self._docker_label_filter).values())
            except BackendError as exc:  # they stay recorded; adopted once discovery finds them
                log.warning("docker discovery at start-up: %s", exc)
        return known

    def recover(self) -> list[str]:
        """Undo what a previous hostd left behind (it crashed, or was killed). Returns one line
        per target put back; those that cannot be put back stay recorded and are retried at
        every step; entries for targets this hostd does not know are logged and left alone."""
        record = self._file.load()
        known = self._known_for_recovery(record)
        for target, raw in record.items():
            entry = record_entry(raw)
            if target not in known:
                log.error("vswap record names %r, which is neither configured nor a labelled container: "
                          "left alone (kept in %s)", target, self.state_file)
                self._foreign[target] = raw
            elif entry is None:
                log.error("vswap record entry for %r is not valid (%r): ignored", target, raw)
            else:
                self._record[target] = entry
        done = []
        for target in list(self._record):
            line, _ = self._restore(target, "at start-up")
            if line is not None:
                done.append(line)
            if target in self._record:
                self._pending.add(target)
        if record:
            self._save_best_effort()
        for line in done:
            log.warning("recovered from a previous hostd: %s", line)
        return done

    def _restore(self, target: str, when: str) -> tuple[str | None, list[str]]:
        """Thaw and give the limit back, each regardless of the other. Returns (a line saying
        what was done, or None; the errors). The entry goes once nothing is left to undo. The
        file is not written here."""
        entry = self._record[target]
        backend = self.backend(target)
        done: list[str] = []
        errors: list[str] = []
        if entry["frozen"] or entry["freezing"]:
            try:
                backend.set_frozen(target, False)
                done.append("thawed")
                entry["frozen"] = entry["freezing"] = False
            except TargetGone:
                entry["frozen"] = entry["freezing"] = False
                done.append("gone")
            except Exception as exc:  # BackendError, or a backend's bug: logged, retried, never fatal
                errors.append(f"thaw: {exc}")
        if entry["limited"]:
            own = entry["own_limit_bytes"]
            try:
                backend.set_limit_bytes(target, own)
                done.append("limit back to " + ("none" if own is None else f"{own >> 20} MiB"))
                entry["limited"] = False
            except TargetGone:
                entry["limited"] = False
                if "gone" not in done:
                    done.append("gone")
            except Exception as exc:
                errors.append(f"limit: {exc}")
        if not any(entry[name] for name in RECORD_FLAGS):
            del self._record[target]
            self._pending.discard(target)
        if errors != self._restore_errors.get(target, []):  # once per new reason, not every retry
            for error in errors:
                log.error("could not restore %s %s: %s (kept in %s, retried)", target, when, error,
                          self.state_file)
        if errors:
            self._restore_errors[target] = errors
        else:
            self._restore_errors.pop(target, None)
        return (f"{target}: {', '.join(done)}" if done else None), errors

    # ---- reading ----------------------------------------------------------------------
    def read(self, vm_id: str) -> CgroupReading:
        target = self.targets[vm_id]
        backend = self.backend(target)
        entry = self._record.get(target)
        try:
            usage, swap = backend.usage_bytes(target)
            if entry is None or not entry["limited"]:  # not lowered by us: what it is now is its own...
                current = backend.limit_bytes(target)
                known = self._own_limits.get(target)
                if known is not None and current != known and current in self._set_by_us.get(target, ()):
                    # ...unless it is a limit hostd set itself and lost track of (a write that said it
                    # failed but happened, or said it was undone but was not): never the guest's own.
                    log.error("%s: its limit is %s, a limit hostd set, with nothing recorded to undo it: kept "
                              "%s as its own and put it back", target, _mib(current), _mib(known))
                    entry = self._record[target] = dict(entry or {"freezing": False, "frozen": False})
                    entry.update(own_limit_bytes=known, limited=True)
                    self._pending.add(target)  # undone at the next step, unless the core takes it over
                    self._save_best_effort()
                else:
                    self._own_limits[target] = current
                    self._set_by_us.pop(target, None)
                    if entry is not None:
                        entry["own_limit_bytes"] = current
        except BackendError:
            raise
        except Exception as exc:  # a backend's bug must not stop hostd: this vm is unreadable (logged once)
            raise BackendError(f"{target}: unexpected {type(exc).__name__}: {exc}") from None
        return CgroupReading(usage, swap, self._own_limits.get(target))

    # ---- acting ----------------------------------------------------------------------
    def apply(self, actions: Sequence[HostAction]) -> list[ActionFailure]:
        """Carry out the core's actions; returns one failure for each that failed."""
        self._retry_recovery({action.target for action in actions})
        failures: list[ActionFailure] = []
        for vm_id, cgroup, action, limit_bytes in actions:
            try:
                self._apply_one(cgroup, action, limit_bytes)
                self._failed.pop((vm_id, action), None)
            except Exception as exc:  # BackendError (a RecordError: refused), or a backend's bug
                if self._failed.get((vm_id, action)) != str(exc):  # logged once, retried every second
                    if isinstance(exc, BackendError):
                        log.warning("vm %s: %s failed: %s", vm_id, action, exc)
                    else:
                        log.exception("vm %s: %s failed", vm_id, action)
                self._failed[(vm_id, action)] = str(exc)
                failures.append(ActionFailure(vm_id, action, str(exc)))
                if action == "thaw":
                    self._thaw_retry.add(cgroup)
        if self._dirty:
            self._save_best_effort()
        return failures

    def _retry_recovery(self, acted_on: set[str]) -> None:
        """Entries a previous hostd left that are not undone yet: foreign ones whose target
        discovery has found since, and those whose undoing failed. Once the core acts on a
        target, it is the core's (and restore_all's at exit)."""
        if self._foreign:
            known = set(self.targets.values())
            for target in [t for t in self._foreign if t in known]:
                entry = record_entry(self._foreign.pop(target))
                self._dirty = True
                if entry is not None and target not in self._record:
                    log.info("vswap record entry for %s: now a known target, restoring it", target)
                    self._record[target] = entry
                    self._pending.add(target)
        self._thaw_retry -= acted_on
        for target in list(self._thaw_retry):
            try:
                self._apply_one(target, "thaw", None)
                self._thaw_retry.discard(target)
                log.info("%s thawed (retry)", target)
            except Exception:
                pass  # logged when it first failed
        self._pending -= acted_on
        for target in list(self._pending):
            line, _ = self._restore(target, "(retry)")
            if line is not None:
                log.warning("put back (left by a previous hostd, or a change hostd lost track of): %s", line)
                self._dirty = True

    def _apply_one(self, target: str, action: HostVerb, limit_bytes: int | None) -> None:
        backend = self.backend(target)
        entry = self._record.get(target)
        if action == "limit" and limit_bytes is not None:
            if entry is None or not entry["limited"]:
                previous = None if entry is None else dict(entry)
                entry = self._record[target] = dict(previous or {"freezing": False, "frozen": False})
                entry.update(own_limit_bytes=self._own_limits.get(target), limited=True)
                try:
                    self._save()  # write-ahead: no record, no lowered limit
                except Exception:
                    self._put_back(target, previous)
                    raise
                self._set_by_us.setdefault(target, set()).add(limit_bytes)
                try:
                    backend.set_limit_bytes(target, limit_bytes)
                except Exception:
                    # A write that failed may still have happened (a client timeout, an interrupted
                    # write): the entry is put back only once the limit reads back unchanged.
                    now = self._limit_now(backend, target)
                    if now == limit_bytes:
                        log.warning("%s: the limit write reported a failure but took effect", target)
                        return
                    if now == entry["own_limit_bytes"] and now is not _UNKNOWN:
                        self._put_back(target, previous)
                    else:  # unknown: the intent stays recorded (undone next step unless the core acts)
                        self._pending.add(target)
                    raise
            else:
                self._set_by_us.setdefault(target, set()).add(limit_bytes)
                try:
                    backend.set_limit_bytes(target, limit_bytes)
                except Exception:
                    if self._limit_now(backend, target) != limit_bytes:
                        raise
                    log.warning("%s: the limit write reported a failure but took effect", target)
        elif action == "limit":
            if entry is not None and entry["limited"]:
                try:
                    backend.set_limit_bytes(target, entry["own_limit_bytes"])
                except Exception:
                    if self._limit_now(backend, target) != entry["own_limit_bytes"]:
                        raise
                entry["limited"] = False
                self._drop_if_done(target)
            else:
                backend.set_limit_bytes(target, self._own_limits.get(target))
        elif action == "pageout":  # blind host swap: nothing to undo (the pages fault back in), so no record
            page_out = getattr(backend, "page_out", None)
            if page_out is None:
                raise BackendError(f"{target}: blind host swap needs a cgroup target (the limit alone applies)")
            result = page_out(target, limit_bytes or 0, self._rng)
            self.last_pageout[target] = result
            log.debug("%s: %s", target, result.describe())
        elif action == "freeze":
            previous = None if entry is None else dict(entry)
            entry = self._record[target] = dict(previous or {"own_limit_bytes": self._own_limits.get(target),
                                                             "limited": False, "frozen": False})
            entry["freezing"] = True
            try:
                self._save()  # write-ahead: no record, no freeze
            except Exception:
                self._put_back(target, previous)
                raise
            try:
                backend.set_frozen(target, True)
            except Exception:
                try:  # a failed pause may still have happened (a client timeout): undo whatever did
                    backend.set_frozen(target, False)
                except Exception:
                    self._thaw_retry.add(target)  # the intent stays recorded: thawed later, or at exit
                    raise
                self._put_back(target, previous)
                raise
            entry["frozen"], entry["freezing"] = True, False  # "frozen" only once it is
            self._save_best_effort()  # if this fails the file still says "freezing": thawed all the same
        elif action == "thaw":
            backend.set_frozen(target, False)
            if entry is not None:
                entry["frozen"] = entry["freezing"] = False
                self._drop_if_done(target)

    @staticmethod
    def _limit_now(backend: HostBackend, target: str) -> object:
        """The limit as it reads now, or _UNKNOWN when it cannot be read."""
        try:
            return backend.limit_bytes(target)
        except Exception:
            return _UNKNOWN

    def _put_back(self, target: str, previous: dict[str, Any] | None) -> None:
        """An action that failed: the entry as it was before it (and the file, best effort)."""
        if previous is None:
            self._record.pop(target, None)
        else:
            self._record[target] = previous
        self._dirty = True

    def _drop_if_done(self, target: str) -> None:
        entry = self._record[target]
        if not any(entry[name] for name in RECORD_FLAGS):
            del self._record[target]
        self._save_best_effort()

    def restore_all(self) -> None:
        """At exit: thaw every frozen guest and give every lowered one its limit back (each
        independently); what fails stays recorded for the next start."""
        for target in list(self._record):
            self._restore(target, "at exit")
        self._save_best_effort()
