import shutil
from pathlib import Path

import pytest

from guestagent.cgroup import (
    CgroupReader,
    parse_limit,
    parse_pressure,
    parse_proc_self_cgroup,
    reading_from_v1,
)
from guestagent.errors import CgroupError

DATA = Path(__file__).parent.parent / "data"
MiB = 1 << 20


@pytest.fixture
def v1_root(tmp_path):
    shutil.copytree(DATA / "cgroup_v1", tmp_path / "cg")
    return tmp_path / "cg"


@pytest.fixture
def v2_root(tmp_path):
    shutil.copytree(DATA / "cgroup_v2", tmp_path / "cg")
    return tmp_path / "cg"


def test_v1_real_capture(v1_root):
    reader = CgroupReader.for_path(v1_root)
    assert reader.version == 1
    reading = reader.read()
    assert reading.limit_bytes == 256 * MiB
    assert reading.usage_bytes == 268230656
    assert reading.swap_used_bytes == 54431744  # total_swap
    assert reading.swap_limit_bytes == 1024 * MiB  # memsw limit − limit
    assert reading.major_faults == 9754
    assert reading.refault_anon_pages is not None
    assert reading.oom_kill_events == 0
    # v1 does not provide these: unknown, not zero.
    assert reading.psi_full_avg10 is None
    assert reading.swap_in_pages is None
    assert reading.oom_events is None
    assert reader.pids() == [1234]


def test_v2_sample(v2_root):
    reader = CgroupReader.for_path(v2_root)
    assert reader.version == 2
    reading = reader.read()
    assert reading.limit_bytes == 512 * MiB
    assert reading.usage_bytes == 446693376
    assert reading.swap_used_bytes == 150 * MiB
    assert reading.swap_limit_bytes is None  # "max"
    assert reading.unevictable_bytes == 256 * MiB
    assert reading.swap_in_pages == 51234 and reading.swap_out_pages == 90112
    assert reading.max_events == 4211 and reading.oom_kill_events == 0
    assert reading.psi_full_avg10 == pytest.approx(1.02)
    stats = reading.as_stats()
    assert stats["free_memory"] == 512 * MiB - 446693376
    assert stats["swap_in"] == 51234  # virtio name


def test_v2_without_optional_files_reports_unknown(v2_root, caplog):
    (v2_root / "memory.pressure").unlink()
    (v2_root / "memory.swap.current").unlink()
    reader = CgroupReader.for_path(v2_root)
    reading = reader.read()
    reader.read()
    assert reading.psi_full_avg10 is None and reading.swap_used_bytes is None
    assert sum("memory.pressure" in r.message for r in caplog.records) == 1  # warned once


def test_missing_required_file_is_a_clear_error(v2_root):
    (v2_root / "memory.stat").unlink()
    with pytest.raises(CgroupError, match=r"memory\.stat"):
        CgroupReader.for_path(v2_root).read()


def test_not_a_cgroup(tmp_path):
    with pytest.raises(CgroupError, match="not a memory cgroup"):
        CgroupReader.for_path(tmp_path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12:memory:/docker/abc\n0::/\n", (1, "/docker/abc")),
        ("4:memory:/process_api/e36\n3:cpuset:/\n0::/\n", (1, "/process_api/e36")),
        ("0::/system.slice/docker-abc.scope\n", (2, "/system.slice/docker-abc.scope")),
        ("5:cpu,memory:/x\n", (1, "/x")),
    ],
)
def test_proc_self_cgroup(text, expected):
    assert parse_proc_self_cgroup(text) == expected


def test_proc_self_cgroup_without_memory():
    with pytest.raises(CgroupError):
        parse_proc_self_cgroup("3:cpu:/a\n")


def test_detect_joins_paths(tmp_path):
    (tmp_path / "memory" / "docker" / "abc").mkdir(parents=True)
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/docker/abc\n0::/\n")
    reader = CgroupReader.detect(tmp_path, proc)
    assert reader.version == 1 and reader.path == tmp_path / "memory" / "docker" / "abc"
    proc.write_text("0::/docker/abc\n")  # private cgroup namespace: path not visible → the mount root
    reader = CgroupReader.detect(tmp_path, proc)
    assert reader.version == 2 and reader.path == tmp_path


@pytest.mark.parametrize(("text", "expected"), [("max\n", None), ("536870912\n", 512 * MiB),
                                                 ("9223372036854771712\n", None)])
def test_parse_limit(text, expected):
    assert parse_limit(text) == expected


def test_parse_pressure_bad():
    with pytest.raises(CgroupError):
        parse_pressure("some avg10=1\n")


def test_v1_hierarchical_totals_preferred():
    files = {"memory.stat": "rss 1\ntotal_rss 5\nswap 2\ntotal_swap 7\n", "memory.usage_in_bytes": "10",
             "memory.limit_in_bytes": "9223372036854771712"}
    reading = reading_from_v1(files)
    assert (reading.anon_bytes, reading.swap_used_bytes, reading.limit_bytes) == (5, 7, None)
    assert reading.swap_limit_bytes is None  # no memsw file: swap accounting off → unknown
