"""What a workload in a guest of the cgroup lab (`balloonctl lab up`) can do to the host: run
as root with a JSON plan, this process joins the guest's memory cgroup, imports what it needs,
becomes the guest's workload user (guestagent.runas, as the lab's own workload does) and then
tries, printing one JSON object as its last line:

  reads          every file in plan["read"] (the control token, the keys, another guest's files,
                 /proc/PID/environ of the agents): "denied" or "READ n bytes"
  signals        kill(pid, 0) on another guest's processes and the agents: "denied" or "ALLOWED"
  control        plan["tries"] changes (host memory, a vm's shares, a manual target) without a
                 token and with a guessed one: what hostd answered, counted
  hello_plain    hellos as plan["other_vm"] without CURVE (one with the live vm's routing id)
  hello_curve    hellos as plan["other_vm"] over CURVE with a key of its own (not allowlisted)
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import zmq

from guestagent.runas import drop_privileges, parse_user
from protocol import Error, ErrorCode, Hello, SetHostParams, SetManualTarget, SetVmParams, decode, encode

MiB = 1 << 20


def answer(sock: zmq.Socket[bytes], frame: bytes, timeout_ms: int) -> str:
    sock.send(frame)
    if not sock.poll(timeout_ms):
        return "no answer"
    message = decode(sock.recv()).message
    if isinstance(message, Error):
        return f"Error {ErrorCode(message.code).name}"
    return message.kind


def attempt(endpoint: str, frame: bytes, timeout_ms: int, routing_id: bytes | None = None,
            curve: tuple[bytes, bytes, bytes] | None = None) -> str:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if routing_id is not None:
            sock.setsockopt(zmq.ROUTING_ID, routing_id)
        if curve is not None:
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = curve
        sock.connect(endpoint)
        return answer(sock, frame, timeout_ms)
    finally:
        sock.close(linger=0)


def try_read(path: str) -> str:
    try:
        if os.path.isdir(path):
            return f"LISTED {len(os.listdir(path))} entries"
        with open(path, "rb") as file:
            return f"READ {len(file.read(4096))} bytes"
    except PermissionError:
        return "denied"
    except FileNotFoundError:
        return "denied (not even found: a parent is closed)" if not os.path.exists(path) else "missing"
    except OSError as exc:
        return f"error {exc.strerror}"


def try_signal(pid: int) -> str:
    try:
        os.kill(pid, 0)
    except PermissionError:
        return "denied"
    except ProcessLookupError:
        return "no such process"
    return "ALLOWED"


def main() -> int:
    plan: dict[str, Any] = json.loads(sys.argv[1])
    Path(plan["cgroup"], "cgroup.procs").write_text(str(os.getpid()))  # now inside the guest
    uid, gid = parse_user(plan["user"])
    os.chdir(plan["workdir"])
    drop_privileges(uid, gid)
    result: dict[str, Any] = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
                              "cgroup": Path("/proc/self/cgroup").read_text()}
    result["reads"] = {path: try_read(path) for path in plan["read"]}
    result["signals"] = {str(pid): try_signal(pid) for pid in plan["signal"]}

    other, tries = plan["other_vm"], plan["tries"]
    changes = [SetHostParams(params={"host_memory_bytes": 64 * MiB}),
               SetVmParams(vm_id=other, params={"shares": "low"}),
               SetManualTarget(vm_id=other, balloon_target_pages=(256 * MiB) // 4096)]
    control: Counter[str] = Counter()
    for index in range(tries):
        change = changes[index % len(changes)]
        if index % 2:  # a guessed token (the real one cannot be read)
            import dataclasses

            change = dataclasses.replace(change, control_token=secrets.token_urlsafe(32))
        control[attempt(plan["control_endpoint"], encode(change, 1), 3000)] += 1
    result["control"] = dict(control)

    hello = encode(Hello(vm_id=other, memsz_bytes=1 << 30, agent_version="probe", page_kind="vpn",
                         supports_2m=False, cgroup_version=0, max_batch_pages=512, held_pages=0,
                         last_host_session_id=plan.get("session_id"), stats_keys=()), 1)
    plain: Counter[str] = Counter()
    for index in range(tries):
        plain[attempt(plan["agent_endpoint"], hello, 500, routing_id=other.encode() if index % 2 else None)] += 1
    result["hello_plain"] = dict(plain)
    curve: Counter[str] = Counter()
    server_key = plan["host_public_key"].encode()
    for _ in range(tries):
        public, secret = zmq.curve_keypair()
        curve[attempt(plan["agent_endpoint"], hello, 500, curve=(public, secret, server_key))] += 1
    result["hello_curve"] = dict(curve)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
