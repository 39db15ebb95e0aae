"""The cgroup lab's security, in pure functions: hostd gets CURVE, each agent its key files by
path, each workload a uid of its own and none of the agent's settings."""

import sys
from pathlib import Path

import pytest

from guestagent.runas import PYTHON_WORKLOADS, RunAsError, no_new_privileges, parse_user
from guestagent.supervise import workload_command, workload_environment
from lab.runner import AUTO_UID_BASE, LabError, workload_users
from lab.spec import Endpoints, GuestSpec, LabKeys, LabSpecError, WorkloadUser, guest_environment, hostd_argv, parse_lab

MiB = 1 << 20
ENDPOINTS = Endpoints("tcp://127.0.0.1:7000", "tcp://127.0.0.1:7001")


def test_hostd_gets_curve_with_the_labs_allowlist():
    keys = LabKeys(Path("/run/lab/keys"))
    argv = hostd_argv("python3", Path("hostd.toml"), ENDPOINTS, Path("/run/lab/events.jsonl"), keys)
    assert argv[argv.index("--curve-secret-key") + 1] == "/run/lab/keys/hostd/host.key_secret"
    assert argv[argv.index("--curve-allowlist") + 1] == "/run/lab/keys/hostd/allow"
    assert argv[argv.index("--control-endpoint") + 1] == "tcp://127.0.0.1:7001"
    assert "--curve-secret-key" not in hostd_argv("python3", Path("h"), ENDPOINTS, Path("/e"))


def test_an_agent_gets_its_own_key_files_by_path_and_the_workload_user():
    guest = GuestSpec("db", 512 * MiB, 512 * MiB, "active 280MiB")
    environment = guest_environment({"PATH": "/bin", "BALLOONLAB_CURVE_CLIENT_KEY": "/elsewhere"}, guest, ENDPOINTS,
                                    Path("/sys/fs/cgroup/memory/lab/db"), Path("/run/lab/guests/db/workload.json"),
                                    LabKeys(Path("/run/lab/keys")),
                                    WorkloadUser(64202, 64202, Path("/run/lab/guests/db")))
    assert environment["BALLOONLAB_CURVE_CLIENT_KEY"] == "/run/lab/keys/db/db.key_secret"
    assert environment["BALLOONLAB_CURVE_SERVER_PUBLIC_KEY"] == "/run/lab/keys/db/host.key"
    assert environment["BALLOONLAB_WORKLOAD_USER"] == "64202:64202"
    assert environment["BALLOONLAB_WORKLOAD_DIR"] == "/run/lab/guests/db"


def test_the_workload_gets_none_of_the_agents_settings():
    agent = {"PATH": "/bin", "SECRET_CI_TOKEN": "x", "PYTHONPATH": "/p", "BALLOONLAB_CURVE_CLIENT_KEY": "/k",
             "BALLOONLAB_CURVE_SERVER_PUBLIC_KEY": "/h", "BALLOONLAB_HOST_ENDPOINT": "tcp://h:1",
             "BALLOONLAB_VM_ID": "db", "BALLOONLAB_WORKLOAD_REPORT": "/w/r.json", "BALLOONLAB_WORKLOAD_USER": "1:1"}
    assert workload_environment(agent, Path("/w")) == {"PATH": "/bin", "PYTHONPATH": "/p", "HOME": "/w",
                                                       "BALLOONLAB_WORKLOAD_REPORT": "/w/r.json"}
    # without a workload user (the compose lab, balloonlab.Lab): only the key paths are taken out
    assert workload_environment(agent, None) == {k: v for k, v in agent.items() if "CURVE" not in k}


def test_our_python_workloads_drop_privileges_themselves_others_start_unprivileged():
    ours = [sys.executable, "-m", "guestagent.workload", "--size", "16MiB"]
    argv, popen = workload_command(ours, (64200, 64200), Path("/w"))
    assert argv == [sys.executable, "-m", "guestagent.runas", "--user", "64200:64200", "--dir", "/w",
                    "guestagent.workload", "--size", "16MiB"]
    assert popen == {"cwd": "/w"}
    argv, popen = workload_command(["stress-ng", "--vm", "1"], (64200, 64201), Path("/w"))
    assert argv == ["stress-ng", "--vm", "1"]
    assert popen == {"user": 64200, "group": 64201, "extra_groups": [], "umask": 0o077, "cwd": "/w",
                     "preexec_fn": no_new_privileges}
    assert workload_command(["stress-ng"], None, None) == (["stress-ng"], {})
    argv, _ = workload_command(["python3", "-m", "some.other.module"], (64200, 64200), Path("/w"))
    assert argv[:3] == ["python3", "-m", "some.other.module"]  # not ours: never root
    assert "lab.skewload" in PYTHON_WORKLOADS


@pytest.mark.parametrize(("text", "expected"), [("nobody", (65534, 65534)), ("64200", (64200, 64200)),
                                                ("64200:100", (64200, 100)), ("0", (0, 0))])
def test_workload_users(text, expected):
    assert parse_user(text) == expected


@pytest.mark.parametrize("text", ["", "no-such-user-here", "12:x", "-1"])
def test_bad_workload_users_are_refused(text):
    with pytest.raises(RunAsError):
        parse_user(text)


def test_each_guest_gets_a_uid_of_its_own_unless_the_lab_file_names_one():
    spec = parse_lab('[guests.a]\nmemory = "128MiB"\nphases = "idle"\n'
                     '[guests.b]\nmemory = "128MiB"\nphases = "idle"\nworkload_user = "nobody"\n'
                     '[guests.c]\nmemory = "128MiB"\nphases = "idle"\n')
    assert spec.guests[1].workload_user == "nobody"
    assert workload_users(spec) == {"a": (AUTO_UID_BASE, AUTO_UID_BASE), "b": (65534, 65534),
                                    "c": (AUTO_UID_BASE + 2, AUTO_UID_BASE + 2)}
    with pytest.raises(LabSpecError, match="workload_user"):
        parse_lab('[guests.a]\nmemory = "128MiB"\nphases = "idle"\nworkload_user = "no-such-user-here"\n')


def test_a_default_uid_that_a_local_account_has_is_refused(monkeypatch):
    import pwd

    real = pwd.getpwuid
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: real(0) if uid == AUTO_UID_BASE else real(uid))
    with pytest.raises(LabError, match="set workload_user"):
        workload_users(parse_lab('[guests.a]\nmemory = "128MiB"\nphases = "idle"\n'))
