"""hostd's CurveZMQ allowlist, with a real hostd process and real sockets (no root needed)."""

from __future__ import annotations

import pytest
import zmq

from protocol import Hello, Welcome, decode, encode
from protocol.keys import allowlist_add, generate_keypair, load_keypair
from tests.integration.hostd_proc import HostdProcess

pytestmark = pytest.mark.integration


def _hello(vm_id: str) -> bytes:
    return encode(Hello(vm_id=vm_id, memsz_bytes=64 << 20, agent_version="t", page_kind="vpn", supports_2m=False,
                        cgroup_version=1, max_batch_pages=512, held_pages=0, last_host_session_id=None,
                        stats_keys=()), 1)


def _try_register(endpoint: str, vm_id: str, client_secret_file, server_public_file) -> object | None:
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.IDENTITY, vm_id.encode())
        sock.setsockopt(zmq.LINGER, 0)
        client = load_keypair(client_secret_file)
        sock.curve_publickey = client.public_key
        sock.curve_secretkey = client.secret_key
        sock.curve_serverkey = load_keypair(server_public_file).public_key
        sock.connect(endpoint)
        sock.send(_hello(vm_id))
        if not sock.poll(1500):
            return None
        return decode(sock.recv()).message
    finally:
        sock.close(linger=0)
        context.destroy(linger=0)


def test_only_allowlisted_agents_get_in(tmp_path):
    keys = tmp_path / "keys"
    server_public, server_secret = generate_keypair(keys, "host")
    good_public, good_secret = generate_keypair(keys, "good")
    _bad_public, bad_secret = generate_keypair(keys, "bad")
    allowlist_add(tmp_path / "allow", good_public, "good")
    hostd = HostdProcess(tmp_path, "--curve-secret-key", str(server_secret), "--curve-allowlist",
                         str(tmp_path / "allow"), "--host-memory", "1GiB")
    try:
        assert isinstance(_try_register(hostd.agent_endpoint, "good", good_secret, server_public), Welcome)
        assert _try_register(hostd.agent_endpoint, "bad", bad_secret, server_public) is None
        vms = {v["vm_id"] for v in hostd.status()["vms"]}
        assert vms == {"good"}
    finally:
        hostd.stop()


def test_plain_tcp_off_loopback_is_refused(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "hostd", "--agent-endpoint", "tcp://0.0.0.0:5999"],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    assert "plain TCP is only allowed on loopback" in result.stderr
