"""The `cgroups` package: parsers as tables over v1 and v2 sample text, the reader, the writer
and detection on tmp trees, the one error type, and the direction of its imports."""

import ast
import shutil
from pathlib import Path

import pytest

import cgroups
from cgroups import (
    UNLIMITED_V1_BYTES,
    CgroupError,
    CgroupGone,
    memory_cgroup_path,
    memory_cgroup_version,
    memory_hierarchy,
    parse_proc_cgroup,
    writer,
)
from cgroups.parse import parse_flat_keyed, parse_limit, parse_pressure, reading_from_v1, reading_from_v2
from cgroups.reader import CgroupReader, memory_and_swap, usage_of

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parent.parent / "data"
MiB = 1 << 20
V1_HUGE = "9223372036854771712"  # what v1 shows for "no limit" (2^63 rounded down to a page)


def sample(version: int, name: str) -> str:
    return (DATA / f"cgroup_v{version}" / name).read_text()


# ---- parsers ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "expected"), [
    ("", {}),
    ("anon 10\nfile 20\n", {"anon": 10, "file": 20}),
    ("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n", {"oom_kill_disable": 0, "under_oom": 0, "oom_kill": 3}),
    ("low 0\nhigh 5\nmax 7\noom 1\noom_kill 1\noom_group_kill 0\n",
     {"low": 0, "high": 5, "max": 7, "oom": 1, "oom_kill": 1, "oom_group_kill": 0}),
    ("garbage\nanon x\n\n  file   4  \nthree words here\n", {"file": 4}),  # bad lines are skipped
    ("frozen 1\npopulated 0\n", {"frozen": 1, "populated": 0}),  # cgroup.events
])
def test_parse_flat_keyed(text, expected):
    assert parse_flat_keyed(text) == expected


@pytest.mark.parametrize(("name", "key", "value"), [
    (("cgroup_v1", "memory.stat"), "total_swap", 54431744),
    (("cgroup_v1", "memory.oom_control"), "oom_kill", 0),
    (("cgroup_v2", "memory.stat"), "pswpin", 51234),
    (("cgroup_v2", "memory.events"), "max", 4211),
])
def test_parse_flat_keyed_sample_files(name, key, value):
    assert parse_flat_keyed((DATA / name[0] / name[1]).read_text())[key] == value


@pytest.mark.parametrize(("text", "expected"), [
    ("max", None),
    ("max\n", None),
    ("  536870912 \n", 512 * MiB),
    ("0\n", 0),
    (V1_HUGE + "\n", None),  # v1's sentinel
    (str(UNLIMITED_V1_BYTES), None),  # the threshold itself
    (str(UNLIMITED_V1_BYTES - 4096), UNLIMITED_V1_BYTES - 4096),
    (sample(1, "memory.limit_in_bytes"), 256 * MiB),
    (sample(1, "memory.memsw.limit_in_bytes"), 1280 * MiB),
    (sample(2, "memory.max"), 512 * MiB),
])
def test_parse_limit(text, expected):
    assert parse_limit(text) == expected


@pytest.mark.parametrize("text", ["", "MAX", "unlimited", "12k", "1.5", "-"])
def test_parse_limit_garbage_is_a_value_error(text):
    with pytest.raises(ValueError):
        parse_limit(text)


def test_parse_pressure_sample():
    pressure = parse_pressure(sample(2, "memory.pressure"))
    assert pressure.full_avg10 == pytest.approx(1.02)
    assert pressure.some_total_us >= pressure.full_total_us >= 0


@pytest.mark.parametrize("text", [
    "",
    "some avg10=1\n",  # no full line, no total
    "some avg10=x avg60=0 avg300=0 total=1\nfull avg10=0 avg60=0 avg300=0 total=1\n",
    "some avg10=0 avg60=0 avg300=0 total=1.5\nfull avg10=0 avg60=0 avg300=0 total=1\n",
])
def test_parse_pressure_garbage(text):
    with pytest.raises(CgroupError, match=r"memory\.pressure: unexpected PSI format"):
        parse_pressure(text)


@pytest.mark.parametrize(("text", "expected"), [
    ("12:memory:/docker/abc\n0::/\n", (1, "/docker/abc")),  # hybrid host: the v1 line wins
    ("0::/\n4:memory:/docker/abc\n", (1, "/docker/abc")),
    ("5:cpu,memory:/x\n", (1, "/x")),
    ("0::/system.slice/docker-abc.scope\n", (2, "/system.slice/docker-abc.scope")),
    ("0::/a:b\n", (2, "/a:b")),  # a colon in the path
    ("junk\n\n0::/ok\n", (2, "/ok")),  # lines that are not ID:CONTROLLERS:PATH are skipped
])
def test_parse_proc_cgroup(text, expected):
    assert parse_proc_cgroup(text) == expected


@pytest.mark.parametrize("text", ["", "3:cpu:/a\n", "1:name=systemd:/x\n", "garbage\n"])
def test_parse_proc_cgroup_without_memory(text):
    with pytest.raises(CgroupError, match=r"^/proc/self/cgroup: no memory cgroup found$"):
        parse_proc_cgroup(text)


def test_v1_and_v2_sample_readings():
    v1 = reading_from_v1({name: sample(1, name) for name in (
        "memory.stat", "memory.usage_in_bytes", "memory.limit_in_bytes", "memory.oom_control", "memory.failcnt",
        "memory.memsw.limit_in_bytes")})
    assert (v1.cgroup_version, v1.limit_bytes, v1.swap_limit_bytes) == (1, 256 * MiB, 1024 * MiB)
    assert v1.psi_full_avg10 is None and v1.swap_in_pages is None  # v1 has neither: unknown, not 0
    v2 = reading_from_v2({name: sample(2, name) for name in (
        "memory.stat", "memory.current", "memory.max", "memory.events", "memory.pressure", "memory.swap.current")})
    assert (v2.cgroup_version, v2.limit_bytes, v2.swap_limit_bytes) == (2, 512 * MiB, None)
    assert v2.max_events == 4211


@pytest.mark.parametrize(("version", "files"), [
    (1, {"memory.stat": "", "memory.usage_in_bytes": "10"}),  # no limit file
    (1, {"memory.stat": "", "memory.usage_in_bytes": "ten", "memory.limit_in_bytes": "max"}),
    (2, {"memory.stat": "", "memory.current": "1"}),
    (2, {"memory.stat": "", "memory.current": "1", "memory.max": "lots"}),
])
def test_readings_from_incomplete_or_garbage_files_raise(version, files):
    with pytest.raises((KeyError, ValueError)):
        (reading_from_v1 if version == 1 else reading_from_v2)(files)


# ---- detection and paths ------------------------------------------------------------------------
def test_memory_cgroup_version(tmp_path):
    with pytest.raises(CgroupError, match="no memory cgroup controller"):
        memory_cgroup_version(tmp_path)
    (tmp_path / "cgroup.controllers").write_text("cpu io\n")
    with pytest.raises(CgroupError):
        memory_cgroup_version(tmp_path)
    (tmp_path / "cgroup.controllers").write_text("cpu io memory pids\n")
    assert memory_cgroup_version(tmp_path) == 2
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(V1_HUGE)
    assert memory_cgroup_version(tmp_path) == 1  # hybrid: v1's memory hierarchy wins


@pytest.mark.parametrize(("version", "relative", "expected"), [
    (1, "/docker/abc", "memory/docker/abc"), (2, "/docker/abc", "docker/abc"), (2, "/", "."),
    (1, "lab/web", "memory/lab/web"),
])
def test_paths(version, relative, expected):
    root = Path("/sys/fs/cgroup")
    assert memory_cgroup_path(version, relative, root) == root / expected
    assert memory_hierarchy(version, root) == (root / "memory" if version == 1 else root)


# ---- the reader -------------------------------------------------------------------------------
@pytest.fixture(params=[1, 2])
def tree(request, tmp_path):
    shutil.copytree(DATA / f"cgroup_v{request.param}", tmp_path / "cg")
    return request.param, tmp_path / "cg"


def test_reader_for_path_and_missing_required_file(tree):
    version, path = tree
    reader = CgroupReader.for_path(path)
    assert reader.version == version and reader.read().usage_bytes > 0
    (path / "memory.stat").unlink()
    with pytest.raises(CgroupError, match=r"memory\.stat: required cgroup file is missing") as raised:
        reader.read()
    assert raised.value.path == str(path / "memory.stat")


def test_reader_garbage_content(tree):
    version, path = tree
    (path / ("memory.usage_in_bytes" if version == 1 else "memory.current")).write_text("lots\n")
    with pytest.raises(CgroupError, match="unexpected cgroup file content"):
        CgroupReader.for_path(path).read()


def test_reader_rejects_a_version(tmp_path):
    with pytest.raises(CgroupError, match="must be 1 or 2"):
        CgroupReader(tmp_path, 3)


def test_usage_of(tree, tmp_path):
    _, path = tree
    memory, _swap = usage_of(path)
    assert memory == CgroupReader.for_path(path).read().usage_bytes
    with pytest.raises(CgroupError, match="not a memory cgroup directory"):
        usage_of(tmp_path / "nowhere")


def test_memory_and_swap(tree, tmp_path):
    version, path = tree
    if version == 2:
        (path / "memory.current").write_text("100\n")
        (path / "memory.swap.current").write_text("7\n")
        assert memory_and_swap(path, 2) == {"memory_bytes": 100, "swap_bytes": 7}
    else:
        (path / "memory.usage_in_bytes").write_text("100\n")
        (path / "memory.memsw.usage_in_bytes").write_text("130\n")
        assert memory_and_swap(path, 1) == {"memory_bytes": 100, "swap_bytes": 30}
    assert memory_and_swap(tmp_path / "gone", version) == {"memory_bytes": None, "swap_bytes": None}


# ---- the writer -------------------------------------------------------------------------------
@pytest.mark.parametrize(("version", "text", "expected"), [
    (1, V1_HUGE, None), (1, "268435456", 256 * MiB), (2, "max", None), (2, "536870912\n", 512 * MiB),
    (2, V1_HUGE, int(V1_HUGE)),  # only v1 has the sentinel
])
def test_memory_limit(tmp_path, version, text, expected):
    (tmp_path / ("memory.limit_in_bytes" if version == 1 else "memory.max")).write_text(text)
    assert writer.memory_limit(tmp_path, version) == expected


@pytest.mark.parametrize(("version", "text"), [(1, "max"), (2, "lots"), (2, "")])
def test_memory_limit_garbage(tmp_path, version, text):
    (tmp_path / ("memory.limit_in_bytes" if version == 1 else "memory.max")).write_text(text)
    with pytest.raises(CgroupError, match="is not a number"):
        writer.memory_limit(tmp_path, version)


def test_memory_limit_missing_file(tmp_path):
    with pytest.raises(CgroupError, match=r"cannot read .*memory\.max"):
        writer.memory_limit(tmp_path, 2)


def test_set_memory_limit_v1_raises_memsw_first_and_never_lowers_it(tmp_path):
    (tmp_path / "memory.limit_in_bytes").write_text("100")
    (tmp_path / "memory.memsw.limit_in_bytes").write_text("200")
    writer.set_memory_limit(tmp_path, 1, 150)
    assert (tmp_path / "memory.memsw.limit_in_bytes").read_text() == "200"
    assert (tmp_path / "memory.limit_in_bytes").read_text() == "150"
    writer.set_memory_limit(tmp_path, 1, 300)
    assert (tmp_path / "memory.memsw.limit_in_bytes").read_text() == "300"
    writer.set_memory_limit(tmp_path, 1, None)
    assert (tmp_path / "memory.memsw.limit_in_bytes").read_text() == "-1"
    assert (tmp_path / "memory.limit_in_bytes").read_text() == "-1"


def test_set_memory_limit_v2_and_bad_values(tmp_path):
    writer.set_memory_limit(tmp_path, 2, None)
    assert (tmp_path / "memory.max").read_text() == "max"
    writer.set_memory_limit(tmp_path, 2, 4096)
    assert (tmp_path / "memory.max").read_text() == "4096"
    with pytest.raises(CgroupError, match="must be ≥ 0"):
        writer.set_memory_limit(tmp_path, 2, -1)
    (tmp_path / "memory.memsw.limit_in_bytes").write_text("lots")
    with pytest.raises(CgroupError, match="not a number"):
        writer.set_memory_limit(tmp_path, 1, 4096)


def test_write_control_file_errors_name_the_file(tmp_path):
    with pytest.raises(CgroupError, match=r"cannot write '1' to .*nowhere/cgroup.freeze") as raised:
        writer.write_control_file(tmp_path / "nowhere" / "cgroup.freeze", "1")
    assert raised.value.path == str(tmp_path / "nowhere" / "cgroup.freeze")


def test_freezing(tmp_path):
    writer.set_frozen(tmp_path, 2, True)
    assert (tmp_path / "cgroup.freeze").read_text() == "1"
    (tmp_path / "cgroup.events").write_text("populated 1\nfrozen 1\n")
    assert writer.is_frozen(tmp_path, 2)
    writer.set_frozen(tmp_path, 1, False)
    assert (tmp_path / "freezer.state").read_text() == "THAWED" and not writer.is_frozen(tmp_path, 1)
    assert writer.v1_freezer("/lab/web/", tmp_path) == tmp_path / "freezer" / "lab" / "web"


def test_create_and_remove(tmp_path):
    parent = writer.create_parent(2, "balloonlab-unit", tmp_path)
    assert (parent / "cgroup.subtree_control").read_text() == "+memory"
    with pytest.raises(CgroupError, match=r"without memory\.swap\.max"):
        writer.create_guest(parent, 2, "web", 64 * MiB, 0)
    assert writer.memory_limit(parent / "web", 2) == 64 * MiB
    (tmp_path / "memory").mkdir()
    with pytest.raises(CgroupError, match="without swap accounting"):
        writer.create_guest(writer.create_parent(1, "balloonlab-unit", tmp_path), 1, "web", 64 * MiB, 0)
    for file in [p for p in tmp_path.rglob("*") if p.is_file()]:  # cgroupfs' files go with their directory
        file.unlink()
    assert writer.pids_in(parent / "web") == []
    writer.remove(parent)
    writer.remove(tmp_path / "memory" / "balloonlab-unit")
    assert not parent.exists() and not (tmp_path / "memory" / "balloonlab-unit").exists()


# ---- one error type, the old names, the direction of imports ----------------------------------
def test_one_error_type_behind_every_old_name():
    from guestagent import errors
    from hostd import cgroupfs
    from lab import cgroups as lab_cgroups

    assert errors.CgroupError is cgroupfs.BackendError is lab_cgroups.CgroupSetupError is CgroupError
    assert cgroupfs.TargetGone is CgroupGone and issubclass(CgroupGone, CgroupError)
    error = CgroupError.at(Path("/x/memory.max"), "gone")
    assert str(error) == "/x/memory.max: gone" and error.path == "/x/memory.max"
    assert CgroupError("plain").path is None


def test_cgroups_imports_nothing_above_it():
    above = {"hostd", "guestagent", "lab", "balloonlab", "bench", "tests", "scenarios"}
    imported = set()
    for path in (ROOT / "cgroups").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):  # function-local imports too
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
    assert not imported & above, sorted(imported & above)
    assert "cgroups" in imported  # the test does look at something
    assert cgroups.__name__ == "cgroups"
