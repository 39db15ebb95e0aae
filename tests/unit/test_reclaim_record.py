"""hostd/reclaim.py's write-ahead record with a fake backend: written before a guest is
squeezed or frozen, emptied as things are undone, and replayed by the next hostd."""

from __future__ import annotations

import json

import pytest

from hostd.cgroupfs import BackendError
from hostd.reclaim import HostReclaimer

MiB = 1 << 20


class FakeBackend:
    root = None

    def __init__(self, limits: dict[str, int | None]) -> None:
        self.limits = dict(limits)
        self.frozen: set[str] = set()
        self.fail: set[str] = set()
        self.log: list[tuple] = []

    def usage_bytes(self, target: str) -> tuple[int, int | None]:
        return 300 * MiB, 0

    def limit_bytes(self, target: str) -> int | None:
        return self.limits[target]

    def set_limit_bytes(self, target: str, limit_bytes: int | None) -> None:
        if target in self.fail:
            raise BackendError(f"cannot write {target}")
        self.log.append(("limit", target, limit_bytes))
        self.limits[target] = limit_bytes

    def set_frozen(self, target: str, frozen: bool) -> None:
        self.log.append(("freeze" if frozen else "thaw", target))
        (self.frozen.add if frozen else self.frozen.discard)(target)


def reclaimer(tmp_path, backend) -> HostReclaimer:
    return HostReclaimer({"a": "lab/a", "b": "docker:b"}, tmp_path / "vswap.json", backend, docker=backend)


def test_record_is_written_before_the_change_and_dropped_once_undone(tmp_path):
    backend = FakeBackend({"lab/a": 512 * MiB, "docker:b": 256 * MiB})
    reclaim = reclaimer(tmp_path, backend)
    assert reclaim.read("a").own_limit_bytes == 512 * MiB
    assert reclaim.apply([("a", "lab/a", "limit", 300 * MiB), ("a", "lab/a", "freeze", None)]) == []
    record = json.loads((tmp_path / "vswap.json").read_text())
    assert record == {"lab/a": {"own_limit_bytes": 512 * MiB, "frozen": True}}
    assert reclaim.read("a").own_limit_bytes == 512 * MiB  # its own, not the lowered 300 MiB
    reclaim.apply([("a", "lab/a", "thaw", None), ("a", "lab/a", "limit", None)])
    assert backend.limits["lab/a"] == 512 * MiB and not backend.frozen
    assert not (tmp_path / "vswap.json").exists()


def test_exit_restores_everything(tmp_path):
    backend = FakeBackend({"lab/a": 512 * MiB, "docker:b": 256 * MiB})
    reclaim = reclaimer(tmp_path, backend)
    reclaim.read("a")
    reclaim.read("b")
    reclaim.apply([("a", "lab/a", "limit", 300 * MiB), ("b", "docker:b", "freeze", None)])
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
    assert reclaim.apply([("a", "lab/a", "limit", 300 * MiB)]) == [("a", "limit", "cannot write lab/a")]
