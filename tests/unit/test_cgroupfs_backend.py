"""The cgroupfs backend on fake cgroup trees (v2 as users mostly run it, v1 as here)."""

from pathlib import Path

import pytest

from hostd.cgroupfs import BackendError, CgroupfsBackend

MiB = 1 << 20


def v2_tree(root: Path) -> CgroupfsBackend:
    (root / "cgroup.controllers").write_text("cpu io memory pids\n")
    guest = root / "lab" / "web"
    guest.mkdir(parents=True)
    (guest / "memory.max").write_text("max\n")
    (guest / "cgroup.freeze").write_text("0\n")
    (guest / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    return CgroupfsBackend(root)


def v1_tree(root: Path) -> CgroupfsBackend:
    (root / "memory").mkdir()
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    guest = root / "memory" / "lab" / "web"
    guest.mkdir(parents=True)
    (guest / "memory.limit_in_bytes").write_text(f"{512 * MiB}\n")
    (guest / "memory.memsw.limit_in_bytes").write_text(f"{1024 * MiB}\n")
    freezer = root / "freezer" / "lab" / "web"
    freezer.mkdir(parents=True)
    (freezer / "freezer.state").write_text("THAWED\n")
    return CgroupfsBackend(root)


def test_v2_limit_and_freeze(tmp_path):
    backend = v2_tree(tmp_path)
    assert backend.version == 2 and backend.limit_bytes("lab/web") is None
    backend.set_limit_bytes("lab/web", 300 * MiB)
    assert (tmp_path / "lab/web/memory.max").read_text() == str(300 * MiB)
    assert backend.limit_bytes("/lab/web/") == 300 * MiB
    backend.set_limit_bytes("lab/web", None)
    assert (tmp_path / "lab/web/memory.max").read_text() == "max"
    backend.set_frozen("lab/web", True)
    assert (tmp_path / "lab/web/cgroup.freeze").read_text() == "1"
    assert not backend.frozen("lab/web")  # the kernel reports it in cgroup.events when done
    (tmp_path / "lab/web/cgroup.events").write_text("populated 1\nfrozen 1\n")
    assert backend.frozen("lab/web")


def test_v1_raises_memsw_first_and_never_lowers_it(tmp_path):
    backend = v1_tree(tmp_path)
    guest = tmp_path / "memory/lab/web"
    assert backend.version == 1 and backend.limit_bytes("lab/web") == 512 * MiB
    backend.set_limit_bytes("lab/web", 256 * MiB)
    assert guest.joinpath("memory.limit_in_bytes").read_text() == str(256 * MiB)
    assert guest.joinpath("memory.memsw.limit_in_bytes").read_text() == f"{1024 * MiB}\n"  # untouched
    backend.set_limit_bytes("lab/web", 2048 * MiB)
    assert guest.joinpath("memory.memsw.limit_in_bytes").read_text() == str(2048 * MiB)
    backend.set_frozen("lab/web", True)
    assert backend.frozen("lab/web")
    assert backend.thaw_all(["lab/web", "lab/missing"]) == ["lab/missing"]
    assert not backend.frozen("lab/web")


@pytest.mark.parametrize("cgroup", ["", "/", "../etc", "lab/../../x", "lab/nope"])
def test_bad_cgroup_paths_are_refused(tmp_path, cgroup):
    backend = v2_tree(tmp_path)
    with pytest.raises(BackendError, match="cgroup"):
        backend.limit_bytes(cgroup)


def test_negative_limit_and_missing_hierarchy(tmp_path):
    with pytest.raises(BackendError, match="≥ 0"):
        v2_tree(tmp_path).set_limit_bytes("lab/web", -1)
    with pytest.raises(BackendError, match="no memory cgroup"):
        _ = CgroupfsBackend(tmp_path / "empty").version


def test_v1_thaw_without_a_freezer_cgroup_is_a_no_op_and_freeze_an_error(tmp_path):
    from hostd.cgroupfs import TargetGone

    backend = v1_tree(tmp_path)
    (tmp_path / "freezer/lab/web/freezer.state").unlink()
    (tmp_path / "freezer/lab/web").rmdir()
    backend.set_frozen("lab/web", False)  # nothing there can be frozen
    with pytest.raises(BackendError, match="no v1 freezer cgroup"):
        backend.set_frozen("lab/web", True)
    with pytest.raises(TargetGone):
        backend.set_frozen("lab/gone", False)
    with pytest.raises(BackendError, match="a path below"):
        backend.set_frozen("../x", False)


def test_a_limit_file_that_is_not_a_number_is_a_backend_error(tmp_path):
    backend = v1_tree(tmp_path)
    (tmp_path / "memory/lab/web/memory.limit_in_bytes").write_text("garbage\n")
    with pytest.raises(BackendError, match="not a number"):
        backend.limit_bytes("lab/web")
