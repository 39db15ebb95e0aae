"""attach run from a container: the host's cgroup tree mounted elsewhere, and a target seen
from a private cgroup namespace (refused with what to do)."""

from __future__ import annotations

from pathlib import Path

import pytest

from guestagent.attach import CGROUP_ROOT, CGROUP_ROOT_ENV, AttachError, cgroup_directory, cgroup_root, resolve


def test_the_cgroup_root_is_the_hosts_tree_unless_mounted_elsewhere(monkeypatch):
    monkeypatch.delenv(CGROUP_ROOT_ENV, raising=False)
    assert cgroup_root() == CGROUP_ROOT == Path("/sys/fs/cgroup")
    monkeypatch.setenv(CGROUP_ROOT_ENV, "/host/sys/fs/cgroup")
    assert cgroup_root() == Path("/host/sys/fs/cgroup")


def test_a_proc_cgroup_path_maps_below_the_mounted_root():
    root = Path("/host/sys/fs/cgroup")
    assert cgroup_directory(1, "/docker/abc", root) == root / "memory" / "docker" / "abc"
    assert cgroup_directory(2, "/system.slice/docker-abc.scope", root) == root / "system.slice" / "docker-abc.scope"


@pytest.mark.parametrize("relative", ["/../docker-abc.scope", "/..", "/a/../b"])
def test_a_cgroup_outside_our_namespace_is_refused_with_the_remedy(relative):
    with pytest.raises(AttachError, match=r"cgroup namespace.*cgroup: host"):
        cgroup_directory(2, relative, Path("/sys/fs/cgroup"))


def test_a_relative_cgroup_target_resolves_below_the_mounted_root(tmp_path, monkeypatch):
    (tmp_path / "memory" / "lab" / "web").mkdir(parents=True)
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (tmp_path / "memory" / "lab" / "web" / "memory.limit_in_bytes").write_text(f"{256 << 20}\n")
    monkeypatch.setenv(CGROUP_ROOT_ENV, str(tmp_path))
    target = resolve("cgroup:lab/web")
    assert (target.cgroup_path, target.cgroup_version, target.default_vm_id) == (
        tmp_path / "memory" / "lab" / "web", 1, "web")
