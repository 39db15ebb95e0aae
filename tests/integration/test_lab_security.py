"""`balloonctl lab up` is secure by default: a process running as a guest's workload user inside
that guest's memory cgroup cannot change host settings, cannot register as another guest,
cannot read the control token or any key, cannot reach another guest's files or processes; and
the lab still balloons (the idle guest ends up ballooned past the active one)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from lab import cgroups
from protocol.keys import load_keypair
from tests.conftest import free_loopback_port, require_root, require_swap
from tests.e2e.compose import wait_for
from tests.integration.lab_guest_probe import attempt
from tests.integration.test_lab_cgroups import LAB_FILE, balloonctl

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.swap, pytest.mark.timeout(600)]
MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
TRIES = 12


def by_vm(snapshot: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {vm["vm_id"]: vm for vm in snapshot.get("vms", [])}


def workload_pid(supervisor_pid: int) -> int:
    for child in psutil.Process(supervisor_pid).children():
        if "guestagent.runas" in child.cmdline():
            return child.pid
    raise AssertionError(f"no workload under balloon-guest {supervisor_pid}")


def agent_pid(supervisor_pid: int) -> int:
    for child in psutil.Process(supervisor_pid).children():
        if child.cmdline()[1:] == ["-m", "guestagent"]:
            return child.pid
    raise AssertionError(f"no agent under balloon-guest {supervisor_pid}")


def private(path: Path, mode: int) -> bool:
    info = path.lstat()
    return info.st_uid == 0 and stat.S_IMODE(info.st_mode) == mode


def test_a_guest_workload_cannot_steer_the_host_and_the_lab_still_balloons(tmp_path: Path, monkeypatch) -> None:
    require_root()
    require_swap(1 << 30)
    monkeypatch.setenv("BALLOONLAB_SAMPLE_PERIOD", "3s")
    monkeypatch.setenv("BALLOONLAB_BALANCE_PERIOD", "2s")
    monkeypatch.setenv("BALLOONLAB_HTTP_ADDRESS", "off")
    lab_file = tmp_path / "lab.toml"
    lab_file.write_text(LAB_FILE)
    state_dir = tmp_path / "state"
    name = f"balloonlab-test-labsec-{os.getpid()}"
    endpoint = f"tcp://127.0.0.1:{free_loopback_port()}"
    agents = f"tcp://127.0.0.1:{free_loopback_port()}"
    common = ["--state-dir", str(state_dir), "--cgroup-name", name]
    parent = cgroups.memory_hierarchy(cgroups.memory_cgroup_version()) / name
    started = time.monotonic()
    up = balloonctl("lab", "up", *common, "--lab-file", str(lab_file), "--agent-endpoint", agents, endpoint=endpoint)
    try:
        assert up.returncode == 0, up.stderr
        up_s = time.monotonic() - started
        print(up.stderr)
        state = json.loads((state_dir / "state.json").read_text())
        keys = Path(state["security"]["keys"])
        token_file = Path(state["security"]["control_token_file"])

        # what is on disk: private to root
        assert private(state_dir, 0o700) and private(keys, 0o700) and private(token_file, 0o600)
        secrets_ = [keys / "hostd" / "host.key_secret", *(keys / g / f"{g}.key_secret" for g in ("web", "batch", "db"))]
        assert all(private(path, 0o600) for path in secrets_), [oct(p.stat().st_mode) for p in secrets_]

        # who runs where: each workload under a uid of its own, no groups, in its guest's cgroup
        guests = state["guests"]
        workloads = {g: workload_pid(entry["pid"]) for g, entry in guests.items()}
        agent_pids = {g: agent_pid(entry["pid"]) for g, entry in guests.items()}
        uids = {}
        for guest, pid in workloads.items():
            process = psutil.Process(pid)
            uids[guest] = process.uids().real
            assert set(process.uids()) == {uids[guest]} and set(process.gids()) == {uids[guest]}
            assert f"{uids[guest]}:{uids[guest]}" == guests[guest]["workload_user"]
            status_lines = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
            assert status_lines["Groups"].strip() == "" and status_lines["NoNewPrivs"].strip() == "1"
            assert pid in cgroups.pids_in(Path(guests[guest]["cgroup"]))
            environment = Path(f"/proc/{pid}/environ").read_bytes().decode()
            assert "CURVE" not in environment and "key_secret" not in environment and "TOKEN" not in environment
            assert "BALLOONLAB_HOST_ENDPOINT" not in environment
        assert 0 not in uids.values() and len(set(uids.values())) == 3, uids
        for pid in agent_pids.values():  # the agents' key files go by path, in their own environment only
            assert "key_secret" not in " ".join(psutil.Process(pid).cmdline())

        # wait until db holds a balloon: the attack must not cost it its ledger
        def db_ballooned() -> bool:
            result = balloonctl("status", "--json", endpoint=endpoint)
            return result.returncode == 0 and by_vm(json.loads(result.stdout)).get("db", {}).get("balloon_bytes", 0) > 0

        assert wait_for(db_ballooned, timeout_s=90, interval_s=1), "db never got a balloon"
        before = json.loads(balloonctl("status", "--json", endpoint=endpoint).stdout)

        plan = {
            "cgroup": guests["web"]["cgroup"], "user": guests["web"]["workload_user"],
            "workdir": guests["web"]["workload_dir"], "other_vm": "db", "tries": TRIES,
            "control_endpoint": endpoint, "agent_endpoint": agents, "session_id": before["host"].get("session_id"),
            "host_public_key": load_keypair(keys / "hostd" / "host.key").public_key.decode(),
            "read": [str(token_file), str(keys), *map(str, secrets_),
                     str(keys / "hostd" / "allow"), str(keys / "web" / "host.key"), str(state_dir),
                     str(state_dir / "state.json"), str(state_dir / "hostd.log"), str(state_dir / "db.log"),
                     guests["batch"]["workload_dir"], guests["batch"]["workload_report"],
                     *(f"/proc/{pid}/environ" for pid in agent_pids.values()),
                     f"/proc/{state['hostd']['pid']}/environ", f"/proc/{workloads['batch']}/environ"],
            "signal": [workloads["batch"], workloads["db"], *agent_pids.values(), state["hostd"]["pid"],
                       guests["web"]["pid"]],
        }
        probe = subprocess.run([sys.executable, "-m", "tests.integration.lab_guest_probe", json.dumps(plan)],
                               capture_output=True, text=True, timeout=180, cwd=ROOT)
        assert probe.returncode == 0, probe.stderr
        tried = json.loads(probe.stdout.strip().splitlines()[-1])
        print(f"from inside web as uid {tried['uid']}: {json.dumps(tried, indent=1)}")
        assert tried["uid"] == uids["web"] and tried["groups"] == []
        assert f"/{name}/web" in tried["cgroup"]
        assert all(result.startswith("denied") for result in tried["reads"].values()), tried["reads"]
        assert all(result == "denied" for result in tried["signals"].values()), tried["signals"]
        assert tried["control"] == {"Error UNAUTHORIZED": TRIES}, tried["control"]
        assert tried["hello_plain"] == {"no answer": TRIES}, tried["hello_plain"]  # CURVE only: no handshake
        assert tried["hello_curve"] == {"no answer": TRIES}, tried["hello_curve"]  # key not allowlisted

        # Even a guest's own agent key (should it leak) registers only its own vm.
        web_key = load_keypair(keys / "web" / "web.key_secret")
        assert web_key.secret_key is not None
        from protocol import Hello, encode

        hello = encode(Hello(vm_id="db", memsz_bytes=1 << 30, agent_version="probe", page_kind="vpn",
                             supports_2m=False, cgroup_version=0, max_batch_pages=512, held_pages=0,
                             last_host_session_id=before["host"].get("session_id"), stats_keys=()), 1)
        leaked = attempt(agents, hello, 3000, curve=(web_key.public_key, web_key.secret_key,
                                                     load_keypair(keys / "hostd" / "host.key").public_key))
        assert leaked == "Error UNAUTHORIZED", leaked

        after = json.loads(balloonctl("status", "--json", endpoint=endpoint).stdout)
        counters = after["host"]["counters"]
        print(f"hostd counters: control_refused {counters.get('control_refused')}, identity_refused "
              f"{counters.get('identity_refused')}; db before {by_vm(before)['db']['balloon_bytes'] // MiB} MiB "
              f"balloon, after {by_vm(after)['db']['balloon_bytes'] // MiB} MiB")
        assert after["host"]["host_memory_bytes"] == before["host"]["host_memory_bytes"]
        assert counters.get("control_refused", 0) >= TRIES and counters.get("identity_refused", 0) >= 1
        db = by_vm(after)["db"]
        assert db["alive"] and db["claimed_memsz_bytes"] == 512 * MiB and db["shares"] == by_vm(before)["db"]["shares"]
        assert db["balloon_bytes"] > 0 and db["ledger_bytes"] > 0, "db lost its balloon"
        assert db["manual_balloon_target_bytes"] is None
        assert sorted(by_vm(after)) == ["batch", "db", "web"]

        # root's balloonctl finds the token by itself: a change is still one command
        same_tax = balloonctl("host", f"idle_tax={before['host']['idle_tax_ratio']}", endpoint=endpoint)
        assert same_tax.returncode == 0, same_tax.stderr
        same_shares = balloonctl("set", "db", "shares=high", endpoint=endpoint)
        assert same_shares.returncode == 0, same_shares.stderr

        latest: dict[str, Any] = {}

        def idle_batch_gives_more() -> bool:
            result = balloonctl("status", "--json", endpoint=endpoint)
            if result.returncode != 0:
                return False
            latest.update(json.loads(result.stdout))
            vms = by_vm(latest)
            return (len(vms) == 3 and vms["batch"]["workload"].get("touches_per_s") == 0
                    and vms["batch"]["balloon_bytes"] > vms["web"]["balloon_bytes"] + 32 * MiB)

        shifted = wait_for(idle_batch_gives_more, timeout_s=240, interval_s=2)
        assert shifted, "under τ = 0.75 the idle batch guest's balloon never grew past the active web guest's"
        vms = by_vm(latest)
        print(f"lab up returned after {up_s:.1f} s; idle batch ballooned past web {time.monotonic() - started:.1f} s "
              f"after lab up: { {g: vm['balloon_bytes'] // MiB for g, vm in vms.items()} } MiB")
        for guest in ("web", "db"):  # the unprivileged workloads still run and report
            assert vms[guest]["workload"]["touches_per_s"] > 0, vms[guest]["workload"]
    finally:
        down = balloonctl("lab", "down", *common, endpoint=endpoint)
        print(down.stderr)
    assert down.returncode == 0, down.stderr
    assert not parent.exists(), "lab down left its cgroups behind"
