"""hostd/reclaim.py's write-ahead record with a fake backend: written (durably, safely) before a
guest is squeezed or frozen, emptied as things are undone, and replayed by the next hostd —
only on targets it knows, thawing and restoring limits independently; a record that cannot be
written refuses the squeeze instead of crashing hostd (review S17, S24)."""

from __future__ import annotations

import errno
import json
import os
import stat

import pytest

from hostd.cgroupfs import BackendError, TargetGone
from hostd.config import HostConfig
from hostd.core import HostCore
from hostd.host_actions import HostAction
from hostd.reclaim import HostReclaimer
from tests.conftest import require

MiB = 1 << 20


class FakeBackend:
    """A host backend in memory. Kept honest by tests/contract/test_backend_contract.py (the same
    suite as CgroupfsBackend's and DockerBackend's): a target it does not know, or one in
    `gone`, is TargetGone for every call; a negative limit is a BackendError."""

    root = None

    def __init__(self, limits: dict[str, int | None]) -> None:
        self.limits = dict(limits)
        self.frozen: set[str] = set()
        self.fail: set[str] = set()  # every write to these fails
        self.fail_freezer: set[str] = set()  # freeze and thaw fail (e.g. the engine unreachable)
        self.no_freezer: set[str] = set()  # freeze fails, thaw does nothing (a v1 cgroup without one)
        self.gone: set[str] = set()
        self.labelled: dict[str, str] = {}  # what docker discovery finds
        self.log: list[tuple] = []

    def discover(self, label: str, label_filter: str) -> dict[str, str]:
        return dict(self.labelled)

    def _check(self, target: str) -> None:
        if target in self.gone or target not in self.limits:
            raise TargetGone(f"{target} is gone")

    def usage_bytes(self, target: str) -> tuple[int, int | None]:
        self._check(target)
        return 300 * MiB, 0

    def limit_bytes(self, target: str) -> int | None:
        self._check(target)
        return self.limits[target]

    def set_limit_bytes(self, target: str, limit_bytes: int | None) -> None:
        self._check(target)
        if limit_bytes is not None and limit_bytes < 0:
            raise BackendError(f"limit {limit_bytes}: must be ≥ 0")
        if target in self.fail:
            raise BackendError(f"cannot write {target}")
        self.log.append(("limit", target, limit_bytes))
        self.limits[target] = limit_bytes

    def set_frozen(self, target: str, frozen: bool) -> None:
        self._check(target)
        if target in self.fail or target in self.fail_freezer or (frozen and target in self.no_freezer):
            raise BackendError(f"no freezer for {target}")
        if target in self.no_freezer:
            return
        self.log.append(("freeze" if frozen else "thaw", target))
        (self.frozen.add if frozen else self.frozen.discard)(target)


def reclaimer(tmp_path, backend, **kwargs) -> HostReclaimer:
    return HostReclaimer({"a": "lab/a", "b": "docker:b"}, tmp_path / "vswap.json", backend, docker=backend,
                         **kwargs)


def record_of(tmp_path) -> dict:
    return json.loads((tmp_path / "vswap.json").read_text())


def write_record(tmp_path, record: dict) -> None:
    (tmp_path / "vswap.json").write_text(json.dumps(record))


def test_record_is_written_before_the_change_and_dropped_once_undone(tmp_path):
    backend = FakeBackend({"lab/a": 512 * MiB, "docker:b": 256 * MiB})
    reclaim = reclaimer(tmp_path, backend)
    assert reclaim.read("a").own_limit_bytes == 512 * MiB
    assert reclaim.apply([HostAction("a", "lab/a", "limit", 300 * MiB), HostAction("a", "lab/a", "freeze", None)]) == []
    record = json.loads((tmp_path / "vswap.json").read_text())
    assert record == {"lab/a": {"own_limit_bytes": 512 * MiB, "limited": True, "freezing": False, "frozen": True}}
    assert reclaim.read("a").own_limit_bytes == 512 * MiB  # its own, not the lowered 300 MiB
    reclaim.apply([HostAction("a", "lab/a", "thaw", None), HostAction("a", "lab/a", "limit", None)])
    assert backend.limits["lab/a"] == 512 * MiB and not backend.frozen
    assert not (tmp_path / "vswap.json").exists()


def test_exit_restores_everything(tmp_path):
    backend = FakeBackend({"lab/a": 512 * MiB, "docker:b": 256 * MiB})
    reclaim = reclaimer(tmp_path, backend)
    reclaim.read("a")
    reclaim.read("b")
    reclaim.apply([HostAction("a", "lab/a", "limit", 300 * MiB), HostAction("b", "docker:b", "freeze", None)])
    reclaim.restore_all()
    assert backend.limits == {"lab/a": 512 * MiB, "docker:b": 256 * MiB} and not backend.frozen
    assert not (tmp_path / "vswap.json").exists()


def test_the_next_hostd_undoes_what_a_killed_one_left(tmp_path):
    backend = FakeBackend({"lab/a": 200 * MiB, "docker:b": 256 * MiB})
    backend.frozen.add("lab/a")
    (tmp_path / "vswap.json").write_text(json.dumps({"lab/a": {"own_limit_bytes": 512 * MiB, "frozen": True}}))
    done = reclaimer(tmp_path, backend).recover()
    assert backend.limits["lab/a"] == 512 * MiB and not backend.frozen
    assert len(done) == 1 and not (tmp_path / "vswap.json").exists()


def test_what_cannot_be_undone_stays_recorded_for_the_next_try(tmp_path):
    backend = FakeBackend({"lab/a": 200 * MiB, "docker:b": 256 * MiB})
    backend.fail.add("lab/a")
    (tmp_path / "vswap.json").write_text(json.dumps({"lab/a": {"own_limit_bytes": 512 * MiB, "frozen": False}}))
    assert reclaimer(tmp_path, backend).recover() == []
    assert "lab/a" in json.loads((tmp_path / "vswap.json").read_text())


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"lab/a": 3}'])
def test_a_damaged_record_changes_nothing(tmp_path, text):
    backend = FakeBackend({"lab/a": 200 * MiB, "docker:b": 256 * MiB})
    (tmp_path / "vswap.json").write_text(text)
    assert reclaimer(tmp_path, backend).recover() == []
    assert backend.log == []


def test_a_failed_write_is_reported_not_raised(tmp_path):
    backend = FakeBackend({"lab/a": 512 * MiB, "docker:b": 256 * MiB})
    backend.fail.add("lab/a")
    reclaim = reclaimer(tmp_path, backend)
    reclaim.read("a")
    assert reclaim.apply([HostAction("a", "lab/a", "limit", 300 * MiB)]) == [("a", "limit", "cannot write lab/a")]


# ---- S17: durable, safe to write, refused rather than crashing -------------------------------
def test_the_file_and_its_directory_are_fsynced(tmp_path, monkeypatch):
    synced: list[bool] = []  # True for a directory
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    backend = FakeBackend({"lab/a": 512 * MiB, "docker:b": 256 * MiB})
    reclaim = reclaimer(tmp_path / "state", backend)
    reclaim.read("a")
    assert reclaim.apply([HostAction("a", "lab/a", "limit", 300 * MiB)]) == []
    assert synced == [False, True]  # the temp file, then the directory after the rename
    synced.clear()
    reclaim.apply([HostAction("a", "lab/a", "limit", None)])
    assert synced == [True] and not (tmp_path / "state/vswap.json").exists()  # the unlink, made durable


def test_the_directory_is_created_0700(tmp_path):
    backend = FakeBackend({"lab/a": 512 * MiB, "docker:b": 256 * MiB})
    reclaim = reclaimer(tmp_path / "run/balloonlab", backend)
    reclaim.read("a")
    assert reclaim.apply([HostAction("a", "lab/a", "freeze", None)]) == []
    assert stat.S_IMODE((tmp_path / "run/balloonlab").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "run/balloonlab/vswap.json").stat().st_mode) == 0o600


def test_a_planted_temp_file_or_symlink_is_neither_followed_nor_reused(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    for name in ("vswap.tmp", ".vswap.json.tmp", "vswap.json.tmp"):  # the old fixed names
        (state / name).symlink_to(victim)
    backend = FakeBackend({"lab/a": 512 * MiB, "docker:b": 256 * MiB})
    reclaim = reclaimer(state, backend)
    reclaim.read("a")
    assert reclaim.apply([HostAction("a", "lab/a", "limit", 300 * MiB)]) == []
    assert victim.read_text() == "precious"
    assert record_of(state)["lab/a"]["own_limit_bytes"] == 512 * MiB
    assert sorted(p.name for p in state.iterdir()) == [".vswap.json.tmp", "vswap.json", "vswap.json.tmp",
                                                       "vswap.tmp"]  # no temp file of ours left over


def test_a_symlinked_record_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "vswap.json").symlink_to(victim)
    backend = FakeBackend({"lab/a": 512 * MiB, "docker:b": 256 * MiB})
    reclaim = reclaimer(state, backend)
    assert reclaim.recover() == []  # not read through the link either
    reclaim.read("a")
    assert reclaim.apply([HostAction("a", "lab/a", "limit", 300 * MiB)]) == []
    assert victim.read_text() == "precious" and not (state / "vswap.json").is_symlink()


@pytest.mark.parametrize("problem", ["world-writable", "group-writable", "symlink", "not a directory", "other owner"])
def test_an_unsafe_or_unusable_directory_refuses_the_squeeze_and_the_freeze(tmp_path, problem, caplog):
    state = tmp_path / "state"
    if problem == "symlink":
        (tmp_path / "real").mkdir(mode=0o700)
        state.symlink_to(tmp_path / "real")
    elif problem == "not a directory":
        state.write_text("a file")
    else:
        state.mkdir()
        state.chmod({"world-writable": 0o777, "group-writable": 0o770, "other owner": 0o700}[problem])
        if problem == "other owner":
            require(os.geteuid() == 0, "chown to another user needs root")
            os.chown(state, 65534, 65534)
    backend = FakeBackend({"lab/a": 512 * MiB, "docker:b": 256 * MiB})
    reclaim = reclaimer(state, backend)
    reclaim.read("a")
    failures = reclaim.apply([HostAction("a", "lab/a", "limit", 300 * MiB), HostAction("a", "lab/a", "freeze", None)])
    assert [(vm, action) for vm, action, _ in failures] == [("a", "limit"), ("a", "freeze")]
    assert all("vswap record" in why for _, _, why in failures)
    assert backend.log == [] and backend.limits["lab/a"] == 512 * MiB and not backend.frozen  # refused
    assert "will neither lower a limit nor freeze" in caplog.text
    # and undoing is never refused: a restore needs no record
    assert reclaim.apply([HostAction("a", "lab/a", "limit", None)]) == []


def test_a_write_failure_mid_run_refuses_the_action_and_undoing_still_works(tmp_path, monkeypatch):
    backend = FakeBackend({"lab/a": 512 * MiB, "docker:b": 256 * MiB})
    reclaim = reclaimer(tmp_path, backend)
    reclaim.read("a")
    reclaim.read("b")
    assert reclaim.apply([HostAction("a", "lab/a", "limit", 300 * MiB)]) == []
    real_write = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    failures = reclaim.apply([HostAction("a", "lab/a", "limit", 250 * MiB), HostAction("b", "docker:b", "freeze", None),
                              HostAction("b", "docker:b", "limit", 128 * MiB)])
    assert failures == [("b", "freeze", f"cannot write the vswap record {tmp_path / 'vswap.json'}: "
                                        "No space left on device"),
                        ("b", "limit", f"cannot write the vswap record {tmp_path / 'vswap.json'}: "
                                       "No space left on device")]
    assert backend.limits == {"lab/a": 250 * MiB, "docker:b": 256 * MiB}  # a: already recorded
    assert not backend.frozen and [p.name for p in tmp_path.iterdir()] == ["vswap.json"]  # no temp left
    assert record_of(tmp_path) == {"lab/a": {"own_limit_bytes": 512 * MiB, "limited": True, "freezing": False,
                                             "frozen": False}}
    reclaim.restore_all()  # the undo happens; the record cannot follow (the next start's undo is a no-op)
    assert backend.limits == {"lab/a": 512 * MiB, "docker:b": 256 * MiB}
    monkeypatch.setattr(os, "write", real_write)
    assert reclaim.apply([]) == [] and not (tmp_path / "vswap.json").exists()  # caught up once it can


def test_a_failed_freeze_is_never_recorded_as_frozen(tmp_path):
    backend = FakeBackend({"lab/a": 512 * MiB, "docker:b": 256 * MiB})
    backend.no_freezer.add("lab/a")
    reclaim = reclaimer(tmp_path, backend)
    reclaim.read("a")
    assert reclaim.apply([HostAction("a", "lab/a", "limit", 300 * MiB)]) == []
    assert reclaim.apply([HostAction("a", "lab/a", "freeze", None)]) == [("a", "freeze", "no freezer for lab/a")]
    assert record_of(tmp_path)["lab/a"] == {"own_limit_bytes": 512 * MiB, "limited": True, "freezing": False,
                                            "frozen": False}
    assert reclaim.apply([HostAction("a", "lab/a", "limit", None)]) == []  # the restore is not blocked
    assert backend.limits["lab/a"] == 512 * MiB and not (tmp_path / "vswap.json").exists()


def test_a_freeze_is_announced_before_it_is_tried(tmp_path):
    backend = FakeBackend({"lab/a": 512 * MiB, "docker:b": 256 * MiB})
    reclaim = reclaimer(tmp_path, backend)
    reclaim.read("a")
    seen: list[dict] = []
    real = backend.set_frozen

    def set_frozen(target, frozen):
        seen.append(record_of(tmp_path)[target])
        real(target, frozen)

    backend.set_frozen = set_frozen
    assert reclaim.apply([HostAction("a", "lab/a", "freeze", None)]) == []
    assert seen == [{"own_limit_bytes": 512 * MiB, "limited": False, "freezing": True, "frozen": False}]
    assert record_of(tmp_path)["lab/a"]["frozen"] is True


def test_exit_thaws_and_restores_independently(tmp_path):
    backend = FakeBackend({"lab/a": 512 * MiB, "docker:b": 256 * MiB})
    reclaim = reclaimer(tmp_path, backend)
    reclaim.read("a")
    reclaim.apply([HostAction("a", "lab/a", "limit", 300 * MiB), HostAction("a", "lab/a", "freeze", None)])
    backend.fail_freezer.add("lab/a")  # e.g. the freezer cgroup was removed meanwhile
    reclaim.restore_all()
    assert backend.limits["lab/a"] == 512 * MiB  # the failed thaw did not stop it
    assert record_of(tmp_path) == {"lab/a": {"own_limit_bytes": 512 * MiB, "limited": False, "freezing": False,
                                             "frozen": True}}


# ---- recovery: known targets only, each part on its own ---------------------------------------
def test_recovery_thaws_and_restores_independently(tmp_path):
    backend = FakeBackend({"lab/a": 200 * MiB, "docker:b": 256 * MiB})
    backend.fail_freezer.add("lab/a")
    write_record(tmp_path, {"lab/a": {"own_limit_bytes": 512 * MiB, "frozen": True}})  # the first format
    done = reclaimer(tmp_path, backend).recover()
    assert done == ["lab/a: limit back to 512 MiB"] and backend.limits["lab/a"] == 512 * MiB
    assert record_of(tmp_path)["lab/a"]["frozen"] is True  # the thaw is retried


def test_a_kill_between_freeze_and_its_confirmation_is_thawed(tmp_path):
    backend = FakeBackend({"lab/a": 512 * MiB, "docker:b": 256 * MiB})
    backend.frozen.add("lab/a")
    write_record(tmp_path, {"lab/a": {"own_limit_bytes": 512 * MiB, "limited": False, "freezing": True,
                                      "frozen": False}})
    assert reclaimer(tmp_path, backend).recover() == ["lab/a: thawed"]
    assert not backend.frozen and backend.limits["lab/a"] == 512 * MiB and not (tmp_path / "vswap.json").exists()


def test_failed_recovery_is_retried_each_step_until_it_works(tmp_path):
    backend = FakeBackend({"lab/a": 200 * MiB, "docker:b": 256 * MiB})
    backend.fail.add("lab/a")
    backend.frozen.add("lab/a")
    write_record(tmp_path, {"lab/a": {"own_limit_bytes": 512 * MiB, "frozen": True}})
    reclaim = reclaimer(tmp_path, backend)
    assert reclaim.recover() == []
    assert reclaim.apply([]) == [] and "lab/a" in record_of(tmp_path)
    backend.fail.clear()
    assert reclaim.apply([]) == []
    assert backend.limits["lab/a"] == 512 * MiB and not backend.frozen and not (tmp_path / "vswap.json").exists()


def test_a_target_that_is_gone_leaves_the_record(tmp_path):
    backend = FakeBackend({"lab/a": 200 * MiB, "docker:b": 256 * MiB})
    backend.gone.add("lab/a")
    write_record(tmp_path, {"lab/a": {"own_limit_bytes": 512 * MiB, "frozen": True}})
    assert reclaimer(tmp_path, backend).recover() == ["lab/a: gone"]
    assert not (tmp_path / "vswap.json").exists()


def test_unknown_targets_are_left_alone_and_kept(tmp_path, caplog):
    backend = FakeBackend({"lab/a": 200 * MiB, "docker:b": 256 * MiB, "system.slice/sshd": 64 * MiB,
                           "docker:stranger": 64 * MiB})
    backend.frozen.add("system.slice/sshd")
    stranger = {"own_limit_bytes": 4096, "frozen": True}
    write_record(tmp_path, {"lab/a": {"own_limit_bytes": 512 * MiB, "frozen": False},
                            "system.slice/sshd": stranger, "docker:stranger": stranger})
    reclaim = reclaimer(tmp_path, backend, docker_label="balloonlab.vm")
    assert reclaim.recover() == ["lab/a: limit back to 512 MiB"]
    assert backend.log == [("limit", "lab/a", 512 * MiB)]  # nothing else touched
    assert "system.slice/sshd" in backend.frozen and backend.limits["docker:stranger"] == 64 * MiB
    assert record_of(tmp_path) == {"system.slice/sshd": stranger, "docker:stranger": stranger}
    assert "'system.slice/sshd', which is neither configured nor a labelled container: left alone" in caplog.text
    # the kept entries ride along with later writes, still untouched
    reclaim.read("a")
    reclaim.apply([HostAction("a", "lab/a", "limit", 300 * MiB)])
    assert set(record_of(tmp_path)) == {"lab/a", "system.slice/sshd", "docker:stranger"}
    reclaim.restore_all()
    assert record_of(tmp_path) == {"system.slice/sshd": stranger, "docker:stranger": stranger}


def test_labelled_containers_are_recovered_at_start_or_once_discovered(tmp_path):
    backend = FakeBackend({"lab/a": 512 * MiB, "docker:b": 256 * MiB, "docker:web": 100 * MiB,
                           "docker:db": 100 * MiB})
    backend.frozen |= {"docker:web", "docker:db"}
    entry = {"own_limit_bytes": 384 * MiB, "limited": True, "freezing": False, "frozen": True}
    write_record(tmp_path, {"docker:web": entry, "docker:db": entry})
    backend.labelled = {"web": "docker:web"}  # db's container is not found yet
    reclaim = reclaimer(tmp_path, backend, docker_label="balloonlab.vm")
    assert reclaim.recover() == ["docker:web: thawed, limit back to 384 MiB"]
    assert backend.limits["docker:db"] == 100 * MiB and "docker:db" in backend.frozen
    reclaim.targets["db"] = "docker:db"  # what the server's discovery does
    assert reclaim.apply([]) == []
    assert backend.limits["docker:db"] == 384 * MiB and not backend.frozen and not (tmp_path / "vswap.json").exists()


@pytest.mark.parametrize("entry", [{"own_limit_bytes": 0, "frozen": False}, {"own_limit_bytes": 1 << 51},
                                   {"own_limit_bytes": "512", "frozen": False}, {"own_limit_bytes": True},
                                   {"own_limit_bytes": 512 * MiB, "frozen": "yes"}])
def test_entries_hostd_could_not_have_written_are_ignored(tmp_path, entry):
    backend = FakeBackend({"lab/a": 200 * MiB, "docker:b": 256 * MiB})
    write_record(tmp_path, {"lab/a": entry})
    assert reclaimer(tmp_path, backend).recover() == [] and backend.log == []


def test_a_record_others_can_write_is_not_trusted(tmp_path):
    backend = FakeBackend({"lab/a": 200 * MiB, "docker:b": 256 * MiB})
    write_record(tmp_path, {"lab/a": {"own_limit_bytes": 512 * MiB, "frozen": True}})
    (tmp_path / "vswap.json").chmod(0o666)
    assert reclaimer(tmp_path, backend).recover() == [] and backend.log == []


# ---- S24: a configured cgroup's own limit out of range ----------------------------------------
@pytest.mark.parametrize("limit", [0, 4095, (1 << 50) + 4096, 1 << 51])
def test_an_out_of_range_cgroup_limit_is_no_limit_not_a_crash(limit):
    config = HostConfig(vm_cgroups={"plain": "lab/plain"}, host_memory_bytes=1 << 30)
    core = HostCore(config, "h-test", 0)
    core.observe_cgroup("plain", 100 * MiB, 0, limit, 1000)  # raised ProtocolError before
    assert "plain" not in core.vms and core.counters["cgroup_limit_out_of_range"] == 1
    core.observe_cgroup("plain", 100 * MiB, 0, 512 * MiB, 2000)
    assert core.vms["plain"].memsz_pages == 512 * MiB // 4096
    core.observe_cgroup("plain", 100 * MiB, 0, limit, 3000)  # a known vm keeps its last good limit
    assert core.vms["plain"].host.cgroup_limit_pages == 512 * MiB // 4096


def test_a_failed_thaw_is_retried_until_it_works(tmp_path):
    backend = FakeBackend({"lab/a": 512 * MiB, "docker:b": 256 * MiB})
    reclaim = reclaimer(tmp_path, backend)
    reclaim.read("b")
    assert reclaim.apply([HostAction("b", "docker:b", "freeze", None)]) == []
    backend.fail_freezer.add("docker:b")  # e.g. the Docker engine briefly unreachable
    assert reclaim.apply([HostAction("b", "docker:b", "thaw", None)]) == [("b", "thaw", "no freezer for docker:b")]
    assert reclaim.apply([]) == [] and "docker:b" in backend.frozen  # the core does not ask again
    backend.fail_freezer.clear()
    assert reclaim.apply([]) == []
    assert not backend.frozen and not (tmp_path / "vswap.json").exists()


def test_a_backend_bug_is_a_failed_action_not_a_crash(tmp_path):
    backend = FakeBackend({"lab/a": 512 * MiB, "docker:b": 256 * MiB})
    reclaim = reclaimer(tmp_path, backend)
    reclaim.read("a")

    def broken(target, limit_bytes):
        raise KeyError("HostConfig")

    backend.set_limit_bytes = broken
    assert reclaim.apply([HostAction("a", "lab/a", "limit", 300 * MiB)]) == [("a", "limit", "'HostConfig'")]
    assert not (tmp_path / "vswap.json").exists()  # the entry it wrote ahead was taken back
    backend.usage_bytes = lambda target: 1 / 0
    with pytest.raises(BackendError, match="unexpected ZeroDivisionError"):
        reclaim.read("a")


def test_a_failing_retry_is_logged_once(tmp_path, caplog):
    backend = FakeBackend({"lab/a": 200 * MiB, "docker:b": 256 * MiB})
    backend.fail.add("lab/a")
    write_record(tmp_path, {"lab/a": {"own_limit_bytes": 512 * MiB, "frozen": False}})
    reclaim = reclaimer(tmp_path, backend)
    reclaim.recover()
    for _ in range(5):
        reclaim.apply([])
    assert caplog.text.count("could not restore lab/a") == 1


def test_a_freeze_that_failed_but_may_have_happened_is_undone(tmp_path):
    backend = FakeBackend({"lab/a": 512 * MiB, "docker:b": 256 * MiB})
    reclaim = reclaimer(tmp_path, backend)
    reclaim.read("b")
    real = backend.set_frozen
    calls = []

    def timed_out(target, frozen):  # the engine paused it, the client gave up waiting
        calls.append(frozen)
        real(target, frozen)
        if frozen:
            raise BackendError("container b: pause failed: read timed out")

    backend.set_frozen = timed_out
    assert reclaim.apply([HostAction("b", "docker:b", "freeze", None)])[0][:2] == ("b", "freeze")
    assert calls == [True, False] and not backend.frozen and not (tmp_path / "vswap.json").exists()

    def unreachable(target, frozen):
        calls.append(frozen)
        if frozen:
            real(target, frozen)
        raise BackendError("container b: engine unreachable")

    backend.set_frozen = unreachable
    assert reclaim.apply([HostAction("b", "docker:b", "freeze", None)])[0][:2] == ("b", "freeze")
    assert record_of(tmp_path)["docker:b"]["freezing"] is True  # may be paused: kept for a thaw
    backend.set_frozen = real
    assert reclaim.apply([]) == [] and not backend.frozen and not (tmp_path / "vswap.json").exists()


# ---- the own limit is never learned from a limit hostd set (issue 14: "b restored to 48 MiB") ----
def test_a_lowering_that_failed_but_happened_is_never_taken_for_the_guests_own_limit(tmp_path):
    """The bad interleaving: write-ahead record, lower the limit, the write reports a failure
    although the limit did change (a client timeout, an interrupted write), the entry was put
    back as if nothing happened, the next reading took the lowered 48 MiB for the guest's own
    limit, and every later hostd "restored" the guest to 48 MiB."""
    backend = FakeBackend({"lab/a": 512 * MiB, "docker:b": 256 * MiB})
    reclaim = reclaimer(tmp_path, backend)
    assert reclaim.read("a").own_limit_bytes == 512 * MiB
    real = backend.set_limit_bytes

    def happened_then_failed(target, limit_bytes):
        real(target, limit_bytes)
        raise BackendError(f"cannot write {limit_bytes} to {target}: Interrupted")

    backend.set_limit_bytes = happened_then_failed
    reclaim.apply([HostAction("a", "lab/a", "limit", 48 * MiB)])
    backend.set_limit_bytes = real
    assert backend.limits["lab/a"] == 48 * MiB  # it did happen
    assert reclaim.read("a").own_limit_bytes == 512 * MiB  # not the 48 MiB hostd set
    assert record_of(tmp_path)["lab/a"] == {"own_limit_bytes": 512 * MiB, "limited": True, "freezing": False,
                                            "frozen": False}
    # kill -9 here: the next hostd puts the guest back to its own limit, and learns that one
    again = reclaimer(tmp_path, backend)
    again.recover()
    assert backend.limits["lab/a"] == 512 * MiB and again.read("a").own_limit_bytes == 512 * MiB
    assert not (tmp_path / "vswap.json").exists()


@pytest.mark.parametrize("step", ["first lowering", "next lowering"])
def test_a_lowering_that_failed_and_did_not_happen_changes_nothing(tmp_path, step):
    backend = FakeBackend({"lab/a": 512 * MiB, "docker:b": 256 * MiB})
    reclaim = reclaimer(tmp_path, backend)
    reclaim.read("a")
    if step == "next lowering":
        assert reclaim.apply([HostAction("a", "lab/a", "limit", 300 * MiB)]) == []
    backend.fail.add("lab/a")  # EBUSY: the kernel could not reclaim down to it, the limit is unchanged
    assert reclaim.apply([HostAction("a", "lab/a", "limit", 48 * MiB)])[0][:2] == ("a", "limit")
    backend.fail.discard("lab/a")
    if step == "first lowering":
        assert backend.limits["lab/a"] == 512 * MiB and not (tmp_path / "vswap.json").exists()
    else:
        assert backend.limits["lab/a"] == 300 * MiB and record_of(tmp_path)["lab/a"]["own_limit_bytes"] == 512 * MiB
    assert reclaim.read("a").own_limit_bytes == 512 * MiB


def test_a_restore_that_did_not_take_is_not_learned_as_the_own_limit(tmp_path, caplog):
    """A limit hostd set that it no longer holds a record of (the write said it was put back,
    the backend still shows the lowered value) is not the guest's own: kept, and put back."""
    backend = FakeBackend({"lab/a": 512 * MiB, "docker:b": 256 * MiB})
    reclaim = reclaimer(tmp_path, backend)
    reclaim.read("a")
    reclaim.apply([HostAction("a", "lab/a", "limit", 300 * MiB), HostAction("a", "lab/a", "limit", 48 * MiB)])
    real = backend.set_limit_bytes
    backend.set_limit_bytes = lambda target, limit_bytes: None  # says done, did nothing
    reclaim.apply([HostAction("a", "lab/a", "limit", None)])
    backend.set_limit_bytes = real
    assert backend.limits["lab/a"] == 48 * MiB
    assert reclaim.read("a").own_limit_bytes == 512 * MiB
    assert record_of(tmp_path)["lab/a"]["limited"] is True and "a limit hostd set" in caplog.text
    reclaim.apply([])  # put back at the next step
    assert backend.limits["lab/a"] == 512 * MiB and not (tmp_path / "vswap.json").exists()
    backend.limits["lab/a"] = 1024 * MiB  # the operator raised it: that is its own now
    assert reclaim.read("a").own_limit_bytes == 1024 * MiB
