"""Run INSIDE a guest container of the compose lab (python3 -c / stdin): what a workload in a
guest can do to hostd. Prints one JSON object: each attempt and what came back.

  control_change  a set_host_params to hostd's control port over the lab network
  hello_as_other  a hello as another vm, with this guest's own CURVE key
  hello_plain     a hello as another vm without CURVE
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import zmq

from protocol import Hello, SetHostParams, decode, encode
from protocol.keys import load_keypair

OTHER_VM = sys.argv[1] if len(sys.argv) > 1 else "db"


def attempt(endpoint: str, frame: bytes, curve: bool) -> str:
    context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if curve:
            own = load_keypair(Path(os.environ["BALLOONLAB_CURVE_CLIENT_KEY"]))
            sock.curve_publickey, sock.curve_secretkey = own.public_key, own.secret_key or b""
            sock.curve_serverkey = load_keypair(Path(os.environ["BALLOONLAB_CURVE_SERVER_PUBLIC_KEY"])).public_key
        sock.connect(endpoint)
        sock.send(frame)
        if not sock.poll(3000):
            return "no answer"
        message = decode(sock.recv()).message
        return type(message).__name__ + (f" {message.code}" if hasattr(message, "code") else "")
    finally:
        sock.close(linger=0)


hello = encode(Hello(vm_id=OTHER_VM, memsz_bytes=1 << 30, agent_version="probe", page_kind="vpn",
                     supports_2m=False, cgroup_version=0, max_batch_pages=512, held_pages=0,
                     last_host_session_id=None, stats_keys=()), 1)
change = encode(SetHostParams(params={"host_memory_bytes": 64 << 20}), 1)
print(json.dumps({
    "control_change": attempt("tcp://hostd:5556", change, curve=False),
    "hello_as_other": attempt("tcp://hostd:5555", hello, curve=True),
    "hello_plain": attempt("tcp://hostd:5555", hello, curve=False),
}))
