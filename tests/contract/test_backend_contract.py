"""One contract, every host backend: the same operations hostd/reclaim.py performs (read a
guest's usage and memory limit, lower it, put it back, lift it, freeze and thaw) and the same
errors (a missing guest is TargetGone, a bad request a BackendError — never a KeyError or a raw
OSError), run over

- `fake`: tests/unit/test_reclaim_record.py's FakeBackend, which the reclaim tests trust;
- `cgroupfs-v1-tree`, `cgroupfs-v2-tree`: the real CgroupfsBackend on a fake cgroupfs tree in
  tmp (the files the kernel shows, from tests/data/cgroup_v1 and cgroup_v2);
- `docker-fake-client`: the real DockerBackend on test_docker_backend.py's FakeClient;
- `cgroupfs-v1-real`: the real CgroupfsBackend on a real memory (and freezer) cgroup, a uniquely
  named child created here and removed by a finalizer (root; CI fails without it).

Each guest starts with a 512 MiB limit (and 1 GiB memory+swap where there is one). What one
backend cannot do like the others is recorded in DEVIATIONS with the reason; the case checks
the documented behaviour instead (no xfail).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hostd.cgroupfs import BackendError, CgroupfsBackend, TargetGone
from hostd.docker_backend import DockerBackend
from tests.conftest import require, require_root
from tests.unit.test_docker_backend import CONTAINER_ID, FakeClient, FakeContainer
from tests.unit.test_reclaim_record import FakeBackend

MiB = 1 << 20
LIMIT = 512 * MiB
DATA = Path(__file__).resolve().parent.parent / "data"
REAL_ROOT = Path("/sys/fs/cgroup")
REAL_PREFIX = "balloonlab-contract-"

DEVIATIONS = {
    ("docker-fake-client", "lift"): "Docker cannot lift a memory limit once set: set_limit_bytes(None) is a "
                                    "BackendError (hostd only schedules containers that have one).",
    ("cgroupfs-v1-tree", "lift"): "On v1 `-1` means unlimited and the kernel then shows 9223372036854771712; a "
                                  "plain file keeps -1. Checked: what was written is -1.",
}


class Backend:
    """A backend under contract and what the test needs around it: the guest's target name, a
    missing one, and how to see whether the guest is frozen (the kernel's view)."""

    name: str
    target: str
    missing: str
    backend: Any

    def frozen(self) -> bool:
        return bool(self.backend.frozen(self.target))

    def wait_frozen(self, expected: bool) -> bool:
        return self.frozen() == expected

    def raw_limit(self) -> str:
        raise NotImplementedError


class Fake(Backend):
    name = "fake"
    target, missing = "lab/web", "lab/missing"

    def __init__(self) -> None:
        self.backend = FakeBackend({self.target: LIMIT})

    def frozen(self) -> bool:
        return self.target in self.backend.frozen


def _copy_sample(sample: Path, guest: Path) -> None:
    guest.mkdir(parents=True)
    for file in sample.iterdir():
        if file.name.startswith(("memory.", "cgroup.procs")):
            shutil.copy(file, guest / file.name)


class V2Tree(Backend):
    name = "cgroupfs-v2-tree"
    target, missing = "lab/web", "lab/missing"

    def __init__(self, root: Path) -> None:
        (root / "cgroup.controllers").write_text("cpu io memory pids\n")
        self.guest = root / "lab" / "web"
        _copy_sample(DATA / "cgroup_v2", self.guest)
        (self.guest / "memory.max").write_text(f"{LIMIT}\n")
        (self.guest / "cgroup.freeze").write_text("0\n")
        (self.guest / "cgroup.events").write_text("populated 1\nfrozen 0\n")
        self.backend = CgroupfsBackend(root)

    def wait_frozen(self, expected: bool) -> bool:
        # the kernel's part: cgroup.events says frozen once every task is
        frozen = (self.guest / "cgroup.freeze").read_text().strip() == "1"
        (self.guest / "cgroup.events").write_text(f"populated 1\nfrozen {int(frozen)}\n")
        return self.frozen() == expected

    def raw_limit(self) -> str:
        return (self.guest / "memory.max").read_text().strip()


class V1Tree(Backend):
    name = "cgroupfs-v1-tree"
    target, missing = "lab/web", "lab/missing"

    def __init__(self, root: Path) -> None:
        (root / "memory").mkdir()
        (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
        self.guest = root / "memory" / "lab" / "web"
        _copy_sample(DATA / "cgroup_v1", self.guest)
        (self.guest / "memory.limit_in_bytes").write_text(f"{LIMIT}\n")
        (self.guest / "memory.memsw.limit_in_bytes").write_text(f"{2 * LIMIT}\n")
        freezer = root / "freezer" / "lab" / "web"
        freezer.mkdir(parents=True)
        (freezer / "freezer.state").write_text("THAWED\n")
        self.backend = CgroupfsBackend(root)

    def raw_limit(self) -> str:
        return (self.guest / "memory.limit_in_bytes").read_text().strip()


class Gone(Exception):
    """docker.errors.NotFound as the engine raises it (with its HTTP status)."""

    status_code = 404
    explanation = "No such container"


class EngineClient(FakeClient):
    """test_docker_backend's FakeClient, but a container that is not there is a 404 as the real
    client's (FakeClient's own NotFound has no status: the unknown-error case)."""

    def get(self, name: str) -> FakeContainer:
        if name != self.container.name:
            raise Gone()
        return self.container


class DockerFake(Backend):
    name = "docker-fake-client"
    target, missing = "docker:plain", "docker:missing"

    def __init__(self, root: Path) -> None:
        _copy_sample(DATA / "cgroup_v2", root / "docker" / CONTAINER_ID)
        self.container = FakeContainer(LIMIT, 2 * LIMIT)
        self.backend = DockerBackend(root, client=EngineClient(self.container))


class V1Real(Backend):
    """A real v1 memory cgroup and a freezer cgroup at the same path, made for this test."""

    name = "cgroupfs-v1-real"

    def __init__(self) -> None:
        self.parent = f"{REAL_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.target, self.missing = f"{self.parent}/vm", f"{self.parent}/missing"
        self.dirs: list[Path] = []
        for controller in ("memory", "freezer"):
            parent = REAL_ROOT / controller / self.parent
            parent.mkdir()
            self.dirs.append(parent)
            (parent / "vm").mkdir()
            self.dirs.append(parent / "vm")
        self.guest = REAL_ROOT / "memory" / self.target
        (self.guest / "memory.limit_in_bytes").write_text(str(LIMIT))
        memsw = self.guest / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            memsw.write_text(str(2 * LIMIT))
        self.backend = CgroupfsBackend(REAL_ROOT)

    def wait_frozen(self, expected: bool) -> bool:
        deadline = time.monotonic() + 5  # FREEZING → FROZEN is the kernel's, asynchronously
        while self.frozen() != expected:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def raw_limit(self) -> str:
        return (self.guest / "memory.limit_in_bytes").read_text().strip()

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            (REAL_ROOT / "freezer" / self.target / "freezer.state").write_text("THAWED")
        for path in reversed(self.dirs):
            with contextlib.suppress(FileNotFoundError):
                path.rmdir()


def remove_stale_real_cgroups() -> None:
    """Children left by a run that was killed (its pid is gone): thawed and removed."""
    for controller in ("memory", "freezer"):
        for parent in (REAL_ROOT / controller).glob(f"{REAL_PREFIX}*"):
            pid = parent.name.removeprefix(REAL_PREFIX).split("-")[0]
            if pid.isdigit() and Path(f"/proc/{pid}").exists():
                continue  # a run still going
            for child in [p for p in parent.iterdir() if p.is_dir()] + [parent]:
                with contextlib.suppress(OSError):
                    (child / "freezer.state").write_text("THAWED")
                with contextlib.suppress(OSError):
                    child.rmdir()


def real_v1() -> V1Real:
    require_root()
    require((REAL_ROOT / "memory" / "memory.limit_in_bytes").exists(), "needs a v1 memory cgroup hierarchy")
    require((REAL_ROOT / "freezer").is_dir(), "needs the v1 freezer hierarchy")
    remove_stale_real_cgroups()
    return V1Real()


KINDS = ["fake", "cgroupfs-v1-tree", "cgroupfs-v2-tree", "docker-fake-client",
         pytest.param("cgroupfs-v1-real", marks=[pytest.mark.integration, pytest.mark.root])]


@pytest.fixture(params=KINDS)
def subject(request, tmp_path) -> Iterator[Backend]:
    makers: dict[str, Callable[[], Backend]] = {
        "fake": Fake, "cgroupfs-v1-tree": lambda: V1Tree(tmp_path), "cgroupfs-v2-tree": lambda: V2Tree(tmp_path),
        "docker-fake-client": lambda: DockerFake(tmp_path), "cgroupfs-v1-real": real_v1,
    }
    made = makers[request.param]()
    try:
        yield made
    finally:
        if isinstance(made, V1Real):
            made.remove()


def deviation(subject: Backend, case: str) -> str:
    return DEVIATIONS.get((subject.name, case), "")


# ---- limits -------------------------------------------------------------------------------------
def test_reads_the_guests_own_limit(subject):
    assert subject.backend.limit_bytes(subject.target) == LIMIT


def test_lowers_the_limit_and_reads_it_back(subject):
    subject.backend.set_limit_bytes(subject.target, 128 * MiB)
    assert subject.backend.limit_bytes(subject.target) == 128 * MiB


def test_raises_it_past_the_memory_and_swap_limit(subject):
    """v1 and Docker want memory ≤ memory+swap: the backend raises the latter first."""
    subject.backend.set_limit_bytes(subject.target, 3 * LIMIT)
    assert subject.backend.limit_bytes(subject.target) == 3 * LIMIT


def test_restores_the_limit_it_read(subject):
    """What reclaim.py does on undo: put back the limit read before it changed anything."""
    own = subject.backend.limit_bytes(subject.target)
    subject.backend.set_limit_bytes(subject.target, 64 * MiB)
    subject.backend.set_limit_bytes(subject.target, own)
    assert subject.backend.limit_bytes(subject.target) == own == LIMIT


def test_lifts_the_limit(subject):
    reason = deviation(subject, "lift")
    if subject.name == "docker-fake-client":
        assert reason
        with pytest.raises(BackendError, match="cannot lift"):
            subject.backend.set_limit_bytes(subject.target, None)
        assert subject.backend.limit_bytes(subject.target) == LIMIT  # unchanged
        return
    subject.backend.set_limit_bytes(subject.target, None)
    if subject.name == "cgroupfs-v1-tree":
        assert reason and subject.raw_limit() == "-1"
        return
    assert subject.backend.limit_bytes(subject.target) is None


def test_a_negative_limit_is_a_backend_error_and_changes_nothing(subject):
    with pytest.raises(BackendError):
        subject.backend.set_limit_bytes(subject.target, -1)
    assert subject.backend.limit_bytes(subject.target) == LIMIT


# ---- usage --------------------------------------------------------------------------------------
def test_reads_usage(subject):
    usage, swap = subject.backend.usage_bytes(subject.target)
    assert isinstance(usage, int) and usage >= 0
    assert swap is None or (isinstance(swap, int) and swap >= 0)


# ---- freezing -----------------------------------------------------------------------------------
def test_freezes_and_thaws(subject):
    subject.backend.set_frozen(subject.target, True)
    assert subject.wait_frozen(True)
    subject.backend.set_frozen(subject.target, True)  # again: no error
    assert subject.wait_frozen(True)
    subject.backend.set_frozen(subject.target, False)
    assert subject.wait_frozen(False)
    subject.backend.set_frozen(subject.target, False)
    assert subject.wait_frozen(False)


def test_the_limit_and_the_freezer_are_independent(subject):
    subject.backend.set_frozen(subject.target, True)
    assert subject.wait_frozen(True)
    subject.backend.set_limit_bytes(subject.target, 256 * MiB)
    assert subject.backend.limit_bytes(subject.target) == 256 * MiB
    subject.backend.set_frozen(subject.target, False)
    assert subject.wait_frozen(False) and subject.backend.limit_bytes(subject.target) == 256 * MiB


# ---- a guest that is not there ------------------------------------------------------------------
MISSING_CALLS: dict[str, Callable[[Any, str], object]] = {
    "limit_bytes": lambda b, t: b.limit_bytes(t),
    "set_limit_bytes": lambda b, t: b.set_limit_bytes(t, 128 * MiB),
    "lift_limit": lambda b, t: b.set_limit_bytes(t, None),
    "freeze": lambda b, t: b.set_frozen(t, True),
    "thaw": lambda b, t: b.set_frozen(t, False),
    "usage_bytes": lambda b, t: b.usage_bytes(t),
}


@pytest.mark.parametrize("call", MISSING_CALLS)
def test_a_missing_guest_is_target_gone(subject, call):
    if subject.name == "docker-fake-client" and call == "lift_limit":
        with pytest.raises(BackendError):  # refused before the container is looked up (see "lift")
            MISSING_CALLS[call](subject.backend, subject.missing)
        return
    with pytest.raises(TargetGone):
        MISSING_CALLS[call](subject.backend, subject.missing)
    assert subject.backend.limit_bytes(subject.target) == LIMIT  # the real guest untouched


def test_deviations_name_real_backends_and_cases():
    names = {"fake", "cgroupfs-v1-tree", "cgroupfs-v2-tree", "docker-fake-client", "cgroupfs-v1-real"}
    assert {name for name, _ in DEVIATIONS} <= names
    assert {case for _, case in DEVIATIONS} == {"lift"}
